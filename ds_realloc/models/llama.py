"""LLaMA-family inference on tensor-parallel shards: LLaMA 1/2/3 (GQA, RoPE scaling), Mistral,
Qwen2 (qkv bias), SmolLM2 (tied embeddings), and the attention of Mixtral and Qwen3-MoE (q/k norms).

Weights are the buffers of a fused layout (layout.py), by HF names: per layer
`self_attn.qkv_proj` (this rank's q heads, then its k and v heads), `self_attn.o_proj` (row
parallel), `mlp.gate_up_proj` (gate then up, column parallel), `mlp.down_proj` (row parallel), the
norms (Qwen3's `self_attn.q_norm` / `k_norm` over each head's dims, before RoPE), and the
vocab-parallel `model.embed_tokens` / `lm_head` (or `score` for value heads).
RoPE comes from transformers' own rotary module, so every scaling type it knows works here.
"""

from __future__ import annotations

from typing import Mapping

import torch
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding
from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

from ds_realloc.models.attention import KVCache, attend
from ds_realloc.models.experts import ExpertParallel
from ds_realloc.models.linear import linear
from ds_realloc.models.tp import TensorParallel, VocabShard, local_logits, row_parallel, vocab_embedding

_ROTARY = {"llama": LlamaRotaryEmbedding, "mistral": MistralRotaryEmbedding, "qwen2": Qwen2RotaryEmbedding,
           "mixtral": MixtralRotaryEmbedding, "qwen3_moe": Qwen3MoeRotaryEmbedding}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As HF's LlamaRMSNorm: normalise in fp32, scale in the input dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class LlamaTP:
    """Forward passes of one tensor-parallel shard of a LLaMA-family model."""

    ep = ExpertParallel()  # dense: no expert-parallel peers to keep in step with
    graphable = True  # a decode step has the same kernels every step: CUDA graphs can replay it

    def __init__(self, config, weights: Mapping[str, torch.Tensor], tp: TensorParallel):
        self.config, self.w, self.tp = config, weights, tp
        self.num_layers = config.num_hidden_layers
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.heads = config.num_attention_heads // tp.size
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.kv_heads = kv // tp.size if kv % tp.size == 0 else 1
        self.vocab = VocabShard.of(config.vocab_size, tp)
        self.sliding_window = getattr(config, "sliding_window", None)
        embedding = weights["model.embed_tokens.weight"]
        self.rotary = _ROTARY[config.model_type](config=config).to(embedding.device)
        self.act = ACT2FN[config.hidden_act]
        self.eps = config.rms_norm_eps
        self.dtype, self.device = embedding.dtype, embedding.device

    def _layer(self, i: int, x: torch.Tensor, cos, sin, mask, cache: KVCache | None, start: int) -> torch.Tensor:
        w, p = self.w, f"model.layers.{i}."
        batch, length, _ = x.shape
        h = rms_norm(x, w[p + "input_layernorm.weight"], self.eps)
        qkv = linear(h, w[p + "self_attn.qkv_proj.weight"], w.get(p + "self_attn.qkv_proj.bias"))
        q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                             self.kv_heads * self.head_dim], dim=-1)
        q, k = q.view(batch, length, self.heads, self.head_dim), k.view(batch, length, self.kv_heads, self.head_dim)
        if p + "self_attn.q_norm.weight" in w:
            q = rms_norm(q, w[p + "self_attn.q_norm.weight"], self.eps)
            k = rms_norm(k, w[p + "self_attn.k_norm.weight"], self.eps)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.store(i, k, v, start)
        out = attend(q, k, v, mask).transpose(1, 2).reshape(batch, length, self.heads * self.head_dim)
        x = x + row_parallel(out, w[p + "self_attn.o_proj.weight"], None, self.tp)
        return x + self._mlp(p, rms_norm(x, w[p + "post_attention_layernorm.weight"], self.eps))

    def _mlp(self, p: str, h: torch.Tensor) -> torch.Tensor:
        """The layer's feed-forward block on normalised inputs (a gated MLP; row parallel, all-reduced)."""
        gate, up = linear(h, self.w[p + "mlp.gate_up_proj.weight"]).chunk(2, dim=-1)
        return row_parallel(self.act(gate) * up, self.w[p + "mlp.down_proj.weight"], None, self.tp)

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden] of tokens at cache slots [start, start + T)."""
        x = vocab_embedding(input_ids, self.w["model.embed_tokens.weight"], self.vocab, self.tp)
        cos, sin = self.rotary(x, positions)
        for i in range(self.num_layers):
            x = self._layer(i, x, cos, sin, mask, cache, start)
        return rms_norm(x, self.w["model.norm.weight"], self.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary slice of the logits (fp32)."""
        head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        return local_logits(hidden, head, self.vocab)

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """Per-token scalar values [B, T] of a critic / reward model (`score` head, replicated)."""
        return linear(hidden, self.w["score.weight"]).squeeze(-1).float()
