"""Inference models on tensor-parallel shards, and the no-grad scoring passes built on them:
token log-probs (reference / actor inference) and per-token values (critic / reward)."""

from __future__ import annotations

from typing import Mapping, Protocol

import torch

from ds_realloc.layout.layout import Layout
from ds_realloc.models.attention import KVCache, attention_mask, positions_of
from ds_realloc.models.experts import ExpertParallel
from ds_realloc.models.gpt2 import GPT2TP
from ds_realloc.models.llama import LlamaTP
from ds_realloc.models.mixtral import MoETP
from ds_realloc.models.opt import OPTTP
from ds_realloc.models.registry import family_of
from ds_realloc.models.tp import TensorParallel, VocabShard, token_logprobs
from ds_realloc.utils.dist import group_of


class InferenceModel(Protocol):
    num_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: VocabShard
    sliding_window: int | None
    tp: TensorParallel
    ep: ExpertParallel
    graphable: bool  # whether a decode step can be captured as a CUDA graph (models/generate.py)
    dtype: torch.dtype
    device: torch.device

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               cache: KVCache | None = None, start: int = 0) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def values(self, hidden: torch.Tensor) -> torch.Tensor: ...


def inference_model(config, weights: Mapping[str, torch.Tensor], tp: TensorParallel,
                    ep: ExpertParallel = ExpertParallel()) -> InferenceModel:
    """The inference module of an HF config's family on this rank's shards (a fused layout's buffers)."""
    family = family_of(config).name
    if family in ("mixtral", "qwen3_moe"):
        return MoETP(config, weights, tp, ep)
    return {"gpt2": GPT2TP, "opt": OPTTP}.get(family, LlamaTP)(config, weights, tp)


def parallel_groups(layout: Layout, rank: int) -> tuple[TensorParallel, ExpertParallel]:
    """`rank`'s tensor- and expert-parallel groups in a d/t/p/e layout (its members call this together)."""
    _, tp_rank, _ = layout.coords(rank)
    tp_ranks, ep_ranks = layout.tensor_ranks(rank), layout.expert_ranks(rank)
    tp = TensorParallel.of(len(tp_ranks), tp_rank, group_of(tp_ranks) if len(tp_ranks) > 1 else None)
    ep = ExpertParallel(len(ep_ranks), ep_ranks.index(rank), group_of(ep_ranks) if len(ep_ranks) > 1 else None)
    return tp, ep


def _hidden(model: InferenceModel, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    slots = torch.arange(input_ids.shape[1], device=input_ids.device)
    return model.hidden(input_ids, positions_of(valid), attention_mask(valid.bool(), slots, model.sliding_window))


@torch.no_grad()
def score_logprobs(model: InferenceModel, input_ids: torch.Tensor, attention_mask_: torch.Tensor,
                   last: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) of input_ids[:, t+1] for every position: [B, T-1], like
    functional.token_logprobs; with `last`, only for the last `last` positions ([B, last]; the LM
    head runs on those alone)."""
    hidden, targets = _hidden(model, input_ids, attention_mask_)[:, :-1], input_ids[:, 1:]
    if last is not None:
        hidden, targets = hidden[:, hidden.shape[1] - last:], targets[:, targets.shape[1] - last:]
    logits = model.logits(hidden)
    return token_logprobs(logits / temperature if temperature != 1.0 else logits, targets, model.vocab, model.tp)


@torch.no_grad()
def score_values(model: InferenceModel, input_ids: torch.Tensor, attention_mask_: torch.Tensor) -> torch.Tensor:
    """Per-token values [B, T] of a critic / reward model."""
    return model.values(_hidden(model, input_ids, attention_mask_))


class InferenceCall:
    """What a generate / inference MFC's interface gets: this rank's model on the MFC's layout."""

    def __init__(self, model: InferenceModel):
        self.model = model
        self.device = model.device

    def generate(self, prompts, cfg, eos_token_ids, pad_token_id):
        from ds_realloc.models.generate import generate

        return generate(self.model, prompts, cfg, eos_token_ids, pad_token_id)

    def logprobs(self, input_ids: torch.Tensor, attention_mask_: torch.Tensor, last: int | None = None,
                 temperature: float = 1.0) -> torch.Tensor:
        return score_logprobs(self.model, input_ids.to(self.device), attention_mask_.to(self.device), last,
                              temperature)

    def values(self, input_ids: torch.Tensor, attention_mask_: torch.Tensor) -> torch.Tensor:
        return score_values(self.model, input_ids.to(self.device), attention_mask_.to(self.device))
