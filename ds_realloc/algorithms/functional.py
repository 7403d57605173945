"""The math of the algorithms, as small pure functions over tensors and masks (tested alone).

Conventions: `input_ids`, `attention_mask` and `loss_mask` are [batch, seq]; `loss_mask` is 1 on
tokens that are predicted (answer / completion tokens). Log-probabilities are per predicted
token, aligned with `input_ids[:, 1:]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over all elements, or along `dim`)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t+1] | ...) from logits[:, t]: [batch, seq-1], computed in fp32 without
    materialising a second [batch, seq, vocab] tensor (gather minus logsumexp)."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    return logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy over answer tokens only."""
    return -masked_mean(token_logprobs(logits, input_ids), loss_mask[:, 1:])


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each sequence's answer tokens: [batch]."""
    return (token_logprobs(logits, input_ids) * loss_mask[:, 1:]).sum(-1)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Pairwise reward-model loss -log sigmoid(r_chosen - r_rejected), per pair."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO (Rafailov et al. 2023) per pair, plus the implicit rewards beta*(log pi - log ref)
    of the chosen and rejected answers."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards.detach(), rejected_rewards.detach()
