"""OPT inference on tensor-parallel shards (DeepSpeed-Chat's OPT-1.3b actor / OPT-350m critic).

Per layer, `self_attn.qkv_proj` holds this rank's q, k and v heads (weights and biases), `out_proj`
and `fc2` are row parallel (all-reduce, then the replicated bias), `fc1` column parallel. Layers
normalise before (`do_layer_norm_before`, OPT-1.3b) or after (OPT-350m) each block; the queries are
scaled before attention, as HF does. Positions are learned (offset 2) and replicated; the
vocab-parallel token embedding, of width `word_embed_proj_dim`, doubles as the LM head, with
replicated `project_in` / `project_out` to the hidden width where the two differ.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from ds_realloc.models.attention import KVCache, attend
from ds_realloc.models.experts import ExpertParallel
from ds_realloc.models.linear import linear
from ds_realloc.models.tp import TensorParallel, VocabShard, local_logits, row_parallel, vocab_embedding

_D = "model.decoder."
_POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding


class OPTTP:
    """Forward passes of one tensor-parallel shard of an OPT model."""

    ep = ExpertParallel()  # dense: no expert-parallel peers to keep in step with
    graphable = True  # a decode step has the same kernels every step: CUDA graphs can replay it

    def __init__(self, config, weights: Mapping[str, torch.Tensor], tp: TensorParallel):
        self.config, self.w, self.tp = config, weights, tp
        self.num_layers = config.num_hidden_layers
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.heads = self.kv_heads = config.num_attention_heads // tp.size
        self.vocab = VocabShard.of(config.vocab_size, tp)
        self.sliding_window = None
        self.act = ACT2FN[config.activation_function]
        self.pre_norm = config.do_layer_norm_before
        self.final_norm = self.pre_norm and not getattr(config, "_remove_final_layer_norm", False)
        embedding = weights[_D + "embed_tokens.weight"]
        self.dtype, self.device = embedding.dtype, embedding.device

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.w.get(name + ".weight"), self.w.get(name + ".bias"))

    def _layer(self, i: int, x: torch.Tensor, mask, cache: KVCache | None, start: int) -> torch.Tensor:
        w, p = self.w, f"{_D}layers.{i}."
        batch, length, _ = x.shape
        h = self._norm(x, p + "self_attn_layer_norm") if self.pre_norm else x
        qkv = linear(h, w[p + "self_attn.qkv_proj.weight"], w.get(p + "self_attn.qkv_proj.bias"))
        q, k, v = (t.view(batch, length, self.heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        q = q * self.head_dim ** -0.5
        if cache is not None:
            k, v = cache.store(i, k, v, start)
        out = attend(q, k, v, mask, scale=1.0).transpose(1, 2).reshape(batch, length, self.heads * self.head_dim)
        x = x + row_parallel(out, w[p + "self_attn.out_proj.weight"], w.get(p + "self_attn.out_proj.bias"), self.tp)
        if not self.pre_norm:
            x = self._norm(x, p + "self_attn_layer_norm")
        h = self._norm(x, p + "final_layer_norm") if self.pre_norm else x
        h = self.act(linear(h, w[p + "fc1.weight"], w.get(p + "fc1.bias")))
        x = x + row_parallel(h, w[p + "fc2.weight"], w.get(p + "fc2.bias"), self.tp)
        return x if self.pre_norm else self._norm(x, p + "final_layer_norm")

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Final hidden states [B, T, word_embed_proj_dim] (what the LM head reads)."""
        x = vocab_embedding(input_ids, self.w[_D + "embed_tokens.weight"], self.vocab, self.tp)
        if _D + "project_in.weight" in self.w:
            x = linear(x, self.w[_D + "project_in.weight"])
        x = x + F.embedding(positions + _POSITION_OFFSET, self.w[_D + "embed_positions.weight"])
        for i in range(self.num_layers):
            x = self._layer(i, x, mask, cache, start)
        if self.final_norm:
            x = self._norm(x, _D + "final_layer_norm")
        if _D + "project_out.weight" in self.w:
            x = linear(x, self.w[_D + "project_out.weight"])
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.w.get("lm_head.weight", self.w[_D + "embed_tokens.weight"])
        return local_logits(hidden, head, self.vocab)

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.w["score.weight"]).squeeze(-1).float()
