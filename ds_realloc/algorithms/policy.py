"""Training the policy (PPO-style clipped updates with any advantage estimator), the critic, and
RAFT's best-of-n fine-tuning. The math is in functional.py; this module wires it to MFC data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.distributed as dist

from ds_realloc.algorithms import functional as F
from ds_realloc.algorithms.interface import Batch, Metrics, add_metric, train_micro_batches
from ds_realloc.algorithms.rollout import Rollouts, right_aligned, rollouts_of
from ds_realloc.utils.config import invalid, option

# -- advantage estimators ----------------------------------------------------------------------------

SequenceAdvantage = Callable[[torch.Tensor, Batch, int], torch.Tensor]
SEQUENCE_ADVANTAGES: dict[str, SequenceAdvantage] = {}


def sequence_advantage(name: str):
    """Register an estimator of one advantage per sequence (broadcast to its tokens)."""

    def register(function: SequenceAdvantage) -> SequenceAdvantage:
        SEQUENCE_ADVANTAGES[name] = function
        return function

    return register


@sequence_advantage("grpo")
def _grpo(scores: torch.Tensor, batch: Batch, group_size: int) -> torch.Tensor:
    return F.group_advantages(scores, group_size)


@sequence_advantage("dr_grpo")
def _dr_grpo(scores: torch.Tensor, batch: Batch, group_size: int) -> torch.Tensor:
    return F.group_advantages(scores, group_size, scale=False)


@sequence_advantage("rloo")
def _rloo(scores: torch.Tensor, batch: Batch, group_size: int) -> torch.Tensor:
    return F.leave_one_out_advantages(scores, group_size)


@sequence_advantage("remax")
def _remax(scores: torch.Tensor, batch: Batch, group_size: int) -> torch.Tensor:
    return scores - torch.tensor(batch["greedy_score"], dtype=scores.dtype)


# -- configuration -------------------------------------------------------------------------------------


@dataclass
class PolicyConfig:
    advantage: Literal["gae", "grpo", "dr_grpo", "rloo", "remax"] = option(
        "gae", "advantage estimator: gae (critic), grpo / dr_grpo (group-normalised), rloo (leave-one-out), "
               "remax (greedy baseline)")
    kl_coef: float = option(0.01, "weight of KL(policy || reference)")
    kl_estimator: Literal["k1", "k3"] = option("k1", "per-token KL estimate: k1 = log ratio, k3 = unbiased, >= 0")
    kl_in_reward: bool = option(True, "KL as a per-token reward penalty (else as a loss term)")
    adaptive_kl: bool = option(False, "adapt kl_coef towards kl_target (Ziegler et al.)")
    kl_target: float = option(6.0, "target KL of the adaptive controller")
    kl_horizon: int = option(10000, "horizon of the adaptive controller, in samples")
    gamma: float = option(1.0, "discount")
    lam: float = option(0.95, "GAE lambda")
    clip: float = option(0.2, "PPO ratio clip epsilon")
    value_clip: float = option(0.2, "critic value clip around the old values (0 = no clipping)")
    whiten_advantages: bool = option(True, "normalise advantages to mean 0, std 1 over the step")
    value_norm: bool = option(False, "normalise critic targets with running statistics of the returns")
    value_norm_beta: float = option(0.99, "decay of the running statistics (1 = exact average)")
    entropy_coef: float = option(0.0, "entropy bonus weight")
    epochs: int = option(1, "passes over each step's samples")
    minibatches: int = option(1, "optimizer steps per pass (the step's samples are split)")
    early_stop_kl: float = option(0.0, "skip the step's remaining minibatches once the approximate KL to the "
                                        "sampling policy exceeds this (0 = never)")
    loss_agg: Literal["token-mean", "seq-mean", "token-sum"] = option("token-mean", "how token losses are averaged")
    reward_clip: float = option(5.0, "clip sequence scores to +-this (0 = no clipping)")
    reward_scale: float = option(1.0, "scores are (score - reward_bias) * reward_scale")
    reward_bias: float = option(0.0, "see reward_scale")

    def validate(self) -> None:
        for name in ("epochs", "minibatches"):
            if getattr(self, name) < 1:
                raise invalid(name, "must be at least 1")
        if not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1:
            raise invalid("lam" if not 0 <= self.lam <= 1 else "gamma", "must be within [0, 1]")
        if self.clip <= 0:
            raise invalid("clip", "must be positive")

    def kl_controller(self) -> F.FixedKLController:
        if self.adaptive_kl:
            return F.AdaptiveKLController(self.kl_coef, self.kl_target, self.kl_horizon)
        return F.FixedKLController(self.kl_coef)

    def value_stats(self) -> F.RunningMeanStd | None:
        return F.RunningMeanStd(None if self.value_norm_beta >= 1 else self.value_norm_beta) if self.value_norm else None


# -- targets shared by the policy and the critic ----------------------------------------------------------


@dataclass
class Targets:
    advantages: list[torch.Tensor]  # per row, one per action
    returns: list[torch.Tensor] | None  # per row (GAE only)
    kl: list[torch.Tensor]  # per row, the per-token KL estimate used for rewards / metrics


def _split(flat: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return list(flat.split(lengths))


def rl_targets(cfg: PolicyConfig, batch: Batch, kl_coef: float, value_stats: F.RunningMeanStd | None,
               group_size: int, group) -> Targets:
    """Advantages (and returns for GAE) of the step's rows on this rank, whitened over the training group."""
    lengths = [len(c) for c in batch["completion"]]
    gen = torch.cat(batch["gen_logprobs"])
    ref = torch.cat(batch["ref_logprobs"]) if "ref_logprobs" in batch else gen
    kl = F.kl_estimate(gen, ref, cfg.kl_estimator)
    scores = torch.tensor(batch["score"], dtype=torch.float32)
    clip = cfg.reward_clip or None
    returns = None
    if cfg.advantage == "gae":
        cu = torch.tensor([0] + lengths).cumsum(0)
        rewards = F.shape_rewards(scores, kl, cu, kl_coef if cfg.kl_in_reward else 0.0, clip, cfg.reward_scale,
                                  cfg.reward_bias)
        values = torch.cat(batch["values"])
        if value_stats is not None:
            values = value_stats.denormalize(values)
        advantages, flat_returns = F.gae_packed(rewards, values, cu, torch.tensor(batch["truncated"]), cfg.gamma,
                                                cfg.lam)
        returns = _split(flat_returns, lengths)
    else:
        shaped = (scores - cfg.reward_bias) * cfg.reward_scale
        shaped = shaped.clamp(-clip, clip) if clip else shaped
        per_sequence = SEQUENCE_ADVANTAGES[cfg.advantage](shaped, batch, group_size)
        if cfg.kl_in_reward and kl_coef:
            per_sequence = per_sequence - kl_coef * torch.stack([k.sum() for k in _split(kl, lengths)])
        advantages = torch.cat([per_sequence[i].expand(n) for i, n in enumerate(lengths)])
    if cfg.whiten_advantages:
        advantages = F.whiten(advantages, group=group)
    return Targets(_split(advantages, lengths), returns, _split(kl, lengths))


def _rows(batch: Batch, rows: list[int]) -> Batch:
    return {key: [values[i] for i in rows] for key, values in batch.items()}


def _minibatches(rows: int, count: int) -> list[list[int]]:
    size = rows // count
    return [list(range(i * size, (i + 1) * size)) for i in range(count)]


def _policy_logprobs(engine, rollouts: Rollouts, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, K] of the last K tokens (the completions), and their entropies when asked,
    computing the LM head only where completions are (left padding puts them at the end)."""
    width = rollouts.max_actions
    device = engine.device
    out = engine(input_ids=rollouts.input_ids.to(device), attention_mask=rollouts.attention_mask.to(device),
                 position_ids=rollouts.positions.to(device), logits_to_keep=width + 1, use_cache=False)
    return F.next_token_logprobs(out.logits, rollouts.input_ids[:, -(width + 1):].to(device), entropy)


def _any_rank(flag: bool, group) -> bool:
    tensor = torch.tensor([float(flag)])
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return bool(tensor.item())


@dataclass
class PolicyTrainInterface:
    """Clipped policy-gradient updates of the actor (PPO, GRPO, RLOO, ReMax differ in the advantage)."""

    cfg: PolicyConfig
    micro_batch_size: int
    pad_id: int
    group_size: int = 1
    group: object = None  # the training mesh's process group (whitening, KL statistics, early stop)
    kl: F.FixedKLController = field(default=None)
    value_stats: F.RunningMeanStd | None = field(default=None)

    def __post_init__(self):
        self.kl = self.kl or self.cfg.kl_controller()
        self.value_stats = self.value_stats if self.value_stats is not None else self.cfg.value_stats()

    def state_dict(self) -> dict:
        return {"kl": self.kl.state_dict(), "value_stats": self.value_stats.state_dict() if self.value_stats else None}

    def load_state_dict(self, state: dict) -> None:
        self.kl.load_state_dict(state["kl"])
        if self.value_stats is not None:
            self.value_stats.load_state_dict(state["value_stats"])

    def train_step(self, engine, batch: Batch) -> Metrics:
        targets = rl_targets(self.cfg, batch, self.kl.value, self.value_stats, self.group_size, self.group)
        if self.value_stats is not None:
            self.value_stats.update(torch.cat(targets.returns), group=self.group)
        metrics: Metrics = {}
        lengths = [len(c) for c in batch["completion"]]
        scores = torch.tensor(batch["score"], dtype=torch.float32)
        add_metric(metrics, "reward", float(scores.sum()), float(len(scores)))
        add_metric(metrics, "response_length", float(sum(lengths)), float(len(lengths)))
        add_metric(metrics, "truncated", float(sum(batch["truncated"])), float(len(lengths)))
        kl_sum = float(torch.cat(targets.kl).sum())
        add_metric(metrics, "kl", kl_sum, float(sum(lengths)))
        add_metric(metrics, "kl_coef", self.kl.value, 1.0)
        stopped = False
        for _ in range(self.cfg.epochs):
            for minibatch in _minibatches(len(lengths), self.cfg.minibatches):
                if stopped:
                    break
                part = _rows(batch, minibatch)
                advantages = [targets.advantages[i] for i in minibatch]
                step_metrics = train_micro_batches(engine, len(minibatch), self.micro_batch_size,
                                                   self._loss_of(engine, part, advantages))
                for name, value in step_metrics.items():
                    add_metric(metrics, name, *value)
                approx_kl = step_metrics["approx_kl"][0] / max(step_metrics["approx_kl"][1], 1)
                stopped = bool(self.cfg.early_stop_kl) and _any_rank(approx_kl > self.cfg.early_stop_kl, self.group)
        add_metric(metrics, "early_stopped", float(stopped), 1.0)
        self.kl.update(_group_mean(kl_sum, sum(lengths), self.group), len(lengths))
        return metrics

    def _loss_of(self, engine, batch: Batch, advantages: list[torch.Tensor]):
        cfg = self.cfg

        def loss_of(rows: slice, metrics: Metrics):
            part = {key: values[rows] for key, values in batch.items()}
            rollouts = rollouts_of(part, self.pad_id)
            logprobs, entropies = _policy_logprobs(engine, rollouts, entropy=bool(cfg.entropy_coef))
            width, device = rollouts.max_actions, logprobs.device
            mask = rollouts.action_mask().to(device)
            old = right_aligned(part["gen_logprobs"], width).to(device)
            adv = right_aligned(advantages[rows], width).to(device)
            loss, stats = F.ppo_policy_loss(logprobs, old, adv, mask, cfg.clip, cfg.loss_agg)
            add_metric(metrics, "pg_loss", loss.item(), 1.0)
            if not cfg.kl_in_reward and self.kl.value and "ref_logprobs" in part:
                ref = right_aligned(part["ref_logprobs"], width).to(device)
                loss = loss + self.kl.value * F.aggregate(F.kl_estimate(logprobs, ref, cfg.kl_estimator), mask,
                                                          cfg.loss_agg)
            if cfg.entropy_coef:
                entropy = F.aggregate(entropies, mask, cfg.loss_agg)
                loss = loss - cfg.entropy_coef * entropy
                add_metric(metrics, "entropy", entropy.item(), 1.0)
            for name, value in stats.items():
                add_metric(metrics, name, float(value), 1.0)
            add_metric(metrics, "loss", loss.item(), 1.0)
            return loss, float(rollouts.attention_mask.sum())

        return loss_of


def _group_mean(total: float, count: float, group) -> float:
    stats = torch.tensor([total, count], dtype=torch.float64)
    if group is not None:
        dist.all_reduce(stats, group=group)
    return float(stats[0] / max(stats[1], 1.0))


@dataclass
class CriticTrainInterface:
    """Regresses the critic's values on the GAE returns (clipped around the old values)."""

    cfg: PolicyConfig
    micro_batch_size: int
    pad_id: int
    group: object = None
    kl: F.FixedKLController = field(default=None)
    value_stats: F.RunningMeanStd | None = field(default=None)

    def __post_init__(self):
        self.kl = self.kl or self.cfg.kl_controller()
        self.value_stats = self.value_stats if self.value_stats is not None else self.cfg.value_stats()

    state_dict = PolicyTrainInterface.state_dict
    load_state_dict = PolicyTrainInterface.load_state_dict

    def train_step(self, engine, batch: Batch) -> Metrics:
        targets = rl_targets(self.cfg, batch, self.kl.value, self.value_stats, 1, self.group)
        returns = targets.returns
        old_values = [v[:-1] for v in batch["values"]]  # the states before each action
        if self.value_stats is not None:
            self.value_stats.update(torch.cat(returns), group=self.group)
            returns = [self.value_stats.normalize(r) for r in returns]
        lengths = [len(c) for c in batch["completion"]]
        metrics: Metrics = {}
        for _ in range(self.cfg.epochs):
            for minibatch in _minibatches(len(lengths), self.cfg.minibatches):
                loss_of = self._loss_of(engine, _rows(batch, minibatch), [old_values[i] for i in minibatch],
                                        [returns[i] for i in minibatch])
                for name, value in train_micro_batches(engine, len(minibatch), self.micro_batch_size, loss_of).items():
                    add_metric(metrics, name, *value)
        self.kl.update(_group_mean(float(torch.cat(targets.kl).sum()), sum(lengths), self.group), len(lengths))
        return metrics

    def _loss_of(self, engine, batch: Batch, old_values: list[torch.Tensor], returns: list[torch.Tensor]):
        clip = self.cfg.value_clip or None

        def loss_of(rows: slice, metrics: Metrics):
            part = {key: values[rows] for key, values in batch.items()}
            rollouts = rollouts_of(part, self.pad_id)
            width, device = rollouts.max_actions, engine.device
            values = engine(input_ids=rollouts.input_ids.to(device), attention_mask=rollouts.attention_mask.to(device),
                            position_ids=rollouts.positions.to(device))
            predicted = values[:, -width - 1:-1]  # right-aligned: the state before each action
            mask = rollouts.action_mask().to(device)
            loss = F.value_loss(predicted, right_aligned(old_values[rows], width).to(device),
                                right_aligned(returns[rows], width).to(device), mask, clip, self.cfg.loss_agg)
            add_metric(metrics, "value_loss", loss.item(), 1.0)
            add_metric(metrics, "value", float((predicted.detach() * mask).sum()), float(mask.sum()))
            return loss, float(rollouts.attention_mask.sum())

        return loss_of


@dataclass
class RaftTrainInterface:
    """RAFT: fine-tune on the best of each prompt's samples (when its score beats `threshold`)."""

    micro_batch_size: int
    pad_id: int
    group_size: int
    threshold: float = 0.0

    def train_step(self, engine, batch: Batch) -> Metrics:
        scores = torch.tensor(batch["score"], dtype=torch.float32).view(-1, self.group_size)
        best = scores.argmax(-1) + torch.arange(scores.shape[0]) * self.group_size
        chosen = _rows(batch, best.tolist())
        weights = (scores.max(-1).values > self.threshold).float()  # every rank runs the same forwards
        metrics: Metrics = {}
        add_metric(metrics, "reward", float(scores.sum()), float(scores.numel()))
        add_metric(metrics, "best_reward", float(scores.max(-1).values.sum()), float(scores.shape[0]))
        add_metric(metrics, "kept", float(weights.sum()), float(len(weights)))

        def loss_of(rows: slice, metrics_: Metrics):
            part = {key: values[rows] for key, values in chosen.items()}
            rollouts = rollouts_of(part, self.pad_id)
            logprobs, _ = _policy_logprobs(engine, rollouts)
            mask = rollouts.action_mask().to(logprobs.device) * weights[rows].to(logprobs.device).unsqueeze(-1)
            loss = -(logprobs * mask).sum() / mask.sum().clamp(min=1)
            add_metric(metrics_, "loss", loss.item(), 1.0)
            return loss, float(rollouts.attention_mask.sum())

        for name, value in train_micro_batches(engine, len(best), self.micro_batch_size, loss_of).items():
            add_metric(metrics, name, *value)
        return metrics
