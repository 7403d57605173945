"""Mixture-of-experts inference on tensor-parallel shards: Mixtral and Qwen3-MoE, LLaMA attention
(Qwen3's with q/k norms) and sparse mixture-of-experts blocks.

The expert weights are the fused tensors transformers (5.x) holds in memory - `mlp.experts.gate_up_proj`
[experts, 2 x intermediate, hidden] and `mlp.experts.down_proj` [experts, hidden, intermediate] - and
each rank holds every expert's slice of the intermediate size (gate and up split alike, down by its
input), so an expert's output is a partial sum: one all-reduce per block sums the experts' outputs
over the tensor-parallel ranks. The router `mlp.gate.weight` [experts, hidden] is replicated, so
every rank routes every token alike: softmax in fp32, the top-k, renormalised (Mixtral's rule;
Qwen3-MoE's when `norm_topk_prob`). Qwen3-MoE's dense layers (no router) run LLaMA's MLP.
With expert parallelism the rank holds a block of the experts and its tokens visit the group's
other ranks for the rest (models/experts.py).
"""

from __future__ import annotations

import torch

from ds_realloc.models.experts import ExpertParallel, mixture
from ds_realloc.models.linear import linear
from ds_realloc.models.llama import LlamaTP


class MoETP(LlamaTP):
    graphable = False  # the experts' token counts (and the exchange's sizes) change with the routing
    def __init__(self, config, weights, tp, ep: ExpertParallel = ExpertParallel()):
        super().__init__(config, weights, tp)
        self.experts = getattr(config, "num_local_experts", None) or config.num_experts
        self.top_k, self.ep = config.num_experts_per_tok, ep
        self.renormalise = getattr(config, "norm_topk_prob", True)  # Mixtral has no such field: always

    def route(self, p: str, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k experts [tokens, k] of each token and their (renormalised) weights (fp32)."""
        probs = linear(h, self.w[p + "mlp.gate.weight"]).float().softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return experts, weights / weights.sum(-1, keepdim=True) if self.renormalise else weights

    def _mlp(self, p: str, h: torch.Tensor) -> torch.Tensor:
        if p + "mlp.gate.weight" not in self.w:  # a dense layer
            return super()._mlp(p, h)
        shape = h.shape
        h = h.reshape(-1, shape[-1])
        experts, weights = self.route(p, h)
        gate_up, down = self.w[p + "mlp.experts.gate_up_proj"], self.w[p + "mlp.experts.down_proj"]

        def expert(index: int, x: torch.Tensor) -> torch.Tensor:
            gate, up = linear(x, gate_up[index]).chunk(2, dim=-1)
            return linear(self.act(gate) * up, down[index])

        return self.tp.all_reduce(mixture(h, experts, weights, self.experts, self.ep, expert)).reshape(shape)
