"""GPT-2 inference on tensor-parallel shards.

HF's Conv1D weights are [in, out]: the fused `attn.c_attn` shard holds this rank's q, k and v
columns row by row ([hidden, 3*hidden/tp]), `mlp.c_fc` is split by columns, both `c_proj`s by
rows (row parallel: all-reduce, then the replicated bias). Token embeddings are vocab parallel and
double as the LM head; position embeddings are replicated.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from ds_realloc.models.attention import KVCache, attend
from ds_realloc.models.experts import ExpertParallel
from ds_realloc.models.tp import TensorParallel, VocabShard, local_logits, vocab_embedding


class GPT2TP:
    """Forward passes of one tensor-parallel shard of a GPT-2 model."""

    ep = ExpertParallel()  # dense: no expert-parallel peers to keep in step with
    graphable = True  # a decode step has the same kernels every step: CUDA graphs can replay it

    def __init__(self, config, weights: Mapping[str, torch.Tensor], tp: TensorParallel):
        self.config, self.w, self.tp = config, weights, tp
        self.num_layers = config.n_layer
        self.head_dim = config.n_embd // config.n_head
        self.heads = self.kv_heads = config.n_head // tp.size
        self.vocab = VocabShard.of(config.vocab_size, tp)
        self.sliding_window = None
        self.act = ACT2FN[config.activation_function]
        self.eps = config.layer_norm_epsilon
        embedding = weights["transformer.wte.weight"]
        self.dtype, self.device = embedding.dtype, embedding.device

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.w[name + ".weight"], self.w[name + ".bias"], self.eps)

    def _row_parallel(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.tp.all_reduce(x @ self.w[name + ".weight"]) + self.w[name + ".bias"]

    def _layer(self, i: int, x: torch.Tensor, mask, cache: KVCache | None, start: int) -> torch.Tensor:
        w, p = self.w, f"transformer.h.{i}."
        batch, length, _ = x.shape
        qkv = self._norm(x, p + "ln_1") @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        q, k, v = (t.view(batch, length, self.heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        if cache is not None:
            k, v = cache.store(i, k, v, start)
        out = attend(q, k, v, mask).transpose(1, 2).reshape(batch, length, self.heads * self.head_dim)
        x = x + self._row_parallel(out, p + "attn.c_proj")
        h = self.act(self._norm(x, p + "ln_2") @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
        return x + self._row_parallel(h, p + "mlp.c_proj")

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        x = vocab_embedding(input_ids, self.w["transformer.wte.weight"], self.vocab, self.tp)
        x = x + F.embedding(positions, self.w["transformer.wpe.weight"])
        for i in range(self.num_layers):
            x = self._layer(i, x, mask, cache, start)
        return self._norm(x, "transformer.ln_f")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.w.get("lm_head.weight", self.w["transformer.wte.weight"])
        return local_logits(hidden, head, self.vocab)

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.w["score.weight"]).squeeze(-1).float()
