"""The math of the algorithms, as small pure functions over tensors and masks (tested alone).

Conventions: `input_ids`, `attention_mask` and `loss_mask` are [batch, seq]; `loss_mask` is 1 on
tokens that are predicted (answer / completion tokens). Log-probabilities are per predicted
token, aligned with `input_ids[:, 1:]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_realloc import ops
from ds_realloc.ops import next_token_logprobs  # the one next-token scoring, shared with the engines


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over all elements, or along `dim`)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """`next_token_logprobs` without the entropy: [batch, seq-1]."""
    return next_token_logprobs(logits, input_ids)[0]


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


# ----------------------------------------------------------------------------------------------
# Reinforcement learning. Sequences are packed: the actions (completion tokens) of sequence i are
# positions cu_seqlens[i]:cu_seqlens[i+1] of a 1-D tensor. Values carry one extra entry per
# sequence: v_0..v_n, the values of the states before each of its n actions and after the last.


def gae_packed(rewards: torch.Tensor, values: torch.Tensor, cu_seqlens: torch.Tensor, truncated: torch.Tensor,
               gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over packed sequences; returns (advantages, returns), both [N].

    `values` holds each sequence's n + 1 state values. A sequence that ended (EOS) has a terminal
    value of 0 after its last action; a truncated one (length limit) bootstraps from its last
    value v_n. The op_builder kernel when available, else its vectorised torch reference."""
    return ops.gae(rewards, values, cu_seqlens, truncated, gamma, lam)


def whiten(values: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True,
           group=None) -> torch.Tensor:
    """(x - mean) / std over the valid entries (and over the ranks of `group` when given)."""
    import torch.distributed as dist

    mask = torch.ones_like(values) if mask is None else mask.to(values.dtype)
    stats = torch.stack([(values * mask).sum(), (values * values * mask).sum(), mask.sum()])
    if group is not None:
        dist.all_reduce(stats, group=group)
    mean = stats[0] / stats[2].clamp(min=1)
    var = (stats[1] / stats[2].clamp(min=1) - mean * mean).clamp(min=0)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || ref) estimates from sampled tokens: k1 = log pi - log ref; k3 = r - 1 - log r
    with r = ref / pi (unbiased, always >= 0; Schulman 2020)."""
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator '{kind}' (k1 or k3)")


def shape_scores(scores: torch.Tensor, clip: float | None = None, scale: float = 1.0,
                 bias: float = 0.0) -> torch.Tensor:
    """clip((score - bias) * scale, +-clip): every sequence score the advantages see (ReMax's
    greedy baseline included) goes through this one transform."""
    scores = (scores - bias) * scale
    return scores.clamp(-clip, clip) if clip is not None else scores


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, cu_seqlens: torch.Tensor, kl_coef: float,
                  clip: float | None = None, scale: float = 1.0, bias: float = 0.0) -> torch.Tensor:
    """Per-token rewards [N]: -kl_coef * KL on every action, plus the shaped sequence score
    (`shape_scores`) on its last action."""
    rewards = -kl_coef * kl
    scores = shape_scores(scores, clip, scale, bias)
    last = cu_seqlens[1:] - 1
    rewards = rewards.clone()
    rewards[last] += scores.to(rewards.dtype)
    return rewards


class FixedKLController:
    def __init__(self, coef: float):
        self.value = coef

    def update(self, kl: float, steps: int) -> None:
        return None

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019: coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * steps / horizon, with KL
    the step's mean per-sequence KL (summed over tokens) and steps its sequence count, both over
    every rank of the step."""

    def __init__(self, coef: float, target: float, horizon: int):
        super().__init__(coef)
        self.target, self.horizon = target, horizon

    def update(self, kl: float, steps: int) -> None:
        error = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.value *= 1.0 + error * steps / self.horizon


class RunningMeanStd:
    """Running statistics of the returns for value normalisation: exponential (`beta` < 1) or the
    exact moving average over everything seen (`beta` = None)."""

    def __init__(self, beta: float | None = 0.99, eps: float = 1e-5):
        self.beta, self.eps = beta, eps
        self.mean, self.mean_sq, self.count = 0.0, 1.0, 0.0

    def update(self, values: torch.Tensor, group=None) -> None:
        import torch.distributed as dist

        stats = torch.tensor([values.sum().item(), (values * values).sum().item(), float(values.numel())],
                             dtype=torch.float64)
        if group is not None:
            dist.all_reduce(stats, group=group)
        total, total_sq, n = stats.tolist()
        if n == 0:
            return
        if self.beta is None:
            weight = n / (self.count + n)
        else:
            weight = 1.0 if self.count == 0 else 1.0 - self.beta
        self.mean += weight * (total / n - self.mean)
        self.mean_sq += weight * (total_sq / n - self.mean_sq)
        self.count += n

    @property
    def std(self) -> float:
        return max(self.mean_sq - self.mean**2, 0.0) ** 0.5 + self.eps

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / self.std

    def denormalize(self, values: torch.Tensor) -> torch.Tensor:
        return values * self.std + self.mean

    def state_dict(self) -> dict:
        return {"mean": self.mean, "mean_sq": self.mean_sq, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.mean_sq, self.count = state["mean"], state["mean_sq"], state["count"]


LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
RENAMED_AGGREGATIONS = {"token-sum": "seq-mean-token-sum-norm", "seq-mean": "seq-mean-token-mean"}


def loss_units(lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """What an aggregate divides by, for rows of these action counts: their tokens (token-mean) or
    their sequences (seq-mean-*). The divisor of an optimizer step is the sum over all of its rows
    on all ranks, so the loss is exactly the named mean however the rows are split."""
    if mode == "token-mean":
        return lengths.sum().to(torch.float64)
    if mode in LOSS_AGGREGATIONS:
        return (lengths > 0).sum().to(torch.float64)
    raise ValueError(f"unknown loss aggregation '{mode}'")


def aggregate_sum(losses: torch.Tensor, mask: torch.Tensor, mode: str, norm_tokens: int | None = None) -> torch.Tensor:
    """The rows' share of an aggregate loss before the step-wide division by `loss_units`:
    token-mean: the sum of every action's loss; seq-mean-token-mean: the sum over sequences of each
    one's mean; seq-mean-token-sum-norm (Dr. GRPO): the sum over sequences of each one's token sum
    divided by the constant `norm_tokens` (rollout.max_new_tokens), so a row's weight depends on
    nothing else in its micro-batch."""
    mask = mask.to(losses.dtype)
    if mode == "token-mean":
        return (losses * mask).sum()
    if mode == "seq-mean-token-mean":
        return ((losses * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    if mode == "seq-mean-token-sum-norm":
        if not norm_tokens:
            raise ValueError("seq-mean-token-sum-norm needs the constant divisor norm_tokens")
        return (losses * mask).sum() / norm_tokens
    raise ValueError(f"unknown loss aggregation '{mode}'")


def aggregate(losses: torch.Tensor, mask: torch.Tensor, mode: str, norm_tokens: int | None = None) -> torch.Tensor:
    """The aggregate loss of one batch that is a whole optimizer step: aggregate_sum / loss_units."""
    units = loss_units(mask.sum(-1), mode).clamp(min=1)
    return aggregate_sum(losses, mask, mode, norm_tokens) / units.to(losses.dtype)


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float, mode: str = "token-mean", norm_tokens: int | None = None,
                    weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate max(-A r, -A clip(r, 1-eps, 1+eps)) with r = pi / pi_old, each token's loss
    times `weights` (truncated importance sampling) when given, as `aggregate_sum`; also the sums
    over the actions of the clipped count, the approximate KL 0.5 (log r)^2 and r (divide by the
    action count for the fractions)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip, 1.0 + clip))
    if weights is not None:
        losses = losses * weights
    with torch.no_grad():
        m = mask.to(ratio.dtype)
        stats = {"clip_fraction": float((((ratio - 1.0).abs() > clip).to(m.dtype) * m).sum()),
                 "approx_kl": float((0.5 * log_ratio * log_ratio * m).sum()),
                 "ratio": float((ratio * m).sum())}
    return aggregate_sum(losses, mask, mode, norm_tokens), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None, mode: str = "token-mean", norm_tokens: int | None = None) -> torch.Tensor:
    """0.5 * max((V - R)^2, (V_old + clip(V - V_old, +-eps) - R)^2), or the plain squared error, as
    `aggregate_sum`."""
    losses = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        losses = torch.max(losses, (clipped - returns) ** 2)
    return 0.5 * aggregate_sum(losses, mask, mode, norm_tokens)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - mean of its group) / (std of its group + eps); Dr. GRPO (`scale`=False): no division.
    Groups are consecutive runs of `group_size` samples of one prompt."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(-1, keepdim=True) + eps)
    return centred.view(-1)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: r_i minus the mean reward of the other samples of its prompt."""
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).view(-1)
