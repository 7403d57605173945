"""Training the policy (PPO-style clipped updates with any advantage estimator), the critic, and
RAFT's best-of-n fine-tuning. The math is in functional.py; this module wires it to MFC data.

A step's rewards, KL penalty, advantages and returns are computed once (`TargetsInterface`, the
`rl_targets` MFC) and read by both the actor's and the critic's training. With
`algo.old_logprobs=recompute`, `actor_logp` / `critic_values` score the rollout with the training
engines themselves (no gradient, the update's own micro-batches), so the first minibatch's PPO
ratio is exactly 1 and the value clip is centred on the critic's training-path values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.distributed as dist

from ds_realloc.algorithms import functional as F
from ds_realloc.algorithms.geometry import update_micro_batches, update_minibatches
from ds_realloc.algorithms.interface import (MAX, Batch, InferenceInterface, Metrics, TrainInterface, add_metric,
                                            train_micro_batches)
from ds_realloc.algorithms.rollout import Rollouts, right_aligned, rollouts_of
from ds_realloc.utils.config import invalid, option

# -- advantage estimators ----------------------------------------------------------------------------

SequenceAdvantage = Callable[[torch.Tensor, Batch, int], torch.Tensor]
SEQUENCE_ADVANTAGES: dict[str, SequenceAdvantage] = {}


def sequence_advantage(name: str):
    """Register an estimator of one advantage per sequence (broadcast to its tokens) from the shaped
    scores (`functional.shape_scores`), the batch and the group size."""

    def register(function: SequenceAdvantage) -> SequenceAdvantage:
        if name in SEQUENCE_ADVANTAGES:
            raise ValueError(f"advantage estimator '{name}' is registered twice")
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
    return scores - batch["shaped_greedy_score"]  # the baseline through the same shaping as the scores


# -- configuration -------------------------------------------------------------------------------------


@dataclass
class PolicyConfig:
    advantage: Literal["gae", "grpo", "dr_grpo", "rloo", "remax"] = option(
        "gae", "advantage estimator: gae (critic), grpo / dr_grpo (group-normalised), rloo (leave-one-out), "
               "remax (greedy baseline)")
    # rollout is the default of ppo and grpo by measurement (held-out gain per wall-minute, two seeds each):
    # grpo 9.1 vs 8.2 points/min; ppo 5.1 vs 7.4, within rollout's seed spread (13.2): a tie, to the cheaper
    # mode (README, "Choosing old_logprobs")
    old_logprobs: Literal["recompute", "rollout"] = option(
        "rollout", "the old policy's log-probs (and the critic's old values): recompute = score the rollout "
                   "with the training engine before the update (MFCs actor_logp / critic_values; ratio exactly 1 at "
                   "the first minibatch), rollout = use the generation's log-probs and critic_inf's values (cheaper)")
    tis_cap: float = option(0.0, "truncated importance sampling: weight each token's policy loss by "
                                 "min(exp(old - rollout log-prob), cap); needs old_logprobs=recompute (0 = off)")
    kl_coef: float = option(0.01, "weight of KL(policy || reference)")
    kl_estimator: Literal["k1", "k3"] = option("k1", "per-token KL estimate: k1 = log ratio, k3 = unbiased, >= 0")
    kl_in_reward: bool = option(True, "KL as a per-token reward penalty (else as a loss term)")
    adaptive_kl: bool = option(False, "adapt kl_coef towards kl_target (Ziegler et al.)")
    kl_target: float = option(6.0, "target KL per sequence (summed over its tokens) of the adaptive controller")
    kl_horizon: int = option(10000, "horizon of the adaptive controller, in sequences")
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
    loss_agg: str = option("", "how token losses make an optimizer step's loss, over all its rows on all ranks: "
                               "token-mean, seq-mean-token-mean, seq-mean-token-sum-norm (Dr. GRPO: token sums "
                               "over rollout.max_new_tokens); '' = token-mean, or seq-mean-token-sum-norm for "
                               "advantage=dr_grpo")
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
        if self.loss_agg in F.RENAMED_AGGREGATIONS:
            raise invalid("loss_agg", f"'{self.loss_agg}' was replaced by '{F.RENAMED_AGGREGATIONS[self.loss_agg]}'")
        if self.loss_agg and self.loss_agg not in F.LOSS_AGGREGATIONS:
            raise invalid("loss_agg", f"'{self.loss_agg}' is not one of {', '.join(F.LOSS_AGGREGATIONS)}")
        if self.tis_cap < 0:
            raise invalid("tis_cap", "must be >= 0")
        if self.tis_cap and self.old_logprobs != "recompute":
            raise invalid("tis_cap", "weights by exp(old - rollout log-prob), which needs old_logprobs=recompute")

    @property
    def aggregation(self) -> str:
        return self.loss_agg or ("seq-mean-token-sum-norm" if self.advantage == "dr_grpo" else "token-mean")

    @property
    def recompute(self) -> bool:
        return self.old_logprobs == "recompute"

    def kl_controller(self) -> F.FixedKLController:
        if self.adaptive_kl:
            return F.AdaptiveKLController(self.kl_coef, self.kl_target, self.kl_horizon)
        return F.FixedKLController(self.kl_coef)

    def value_stats(self) -> F.RunningMeanStd | None:
        return F.RunningMeanStd(None if self.value_norm_beta >= 1 else self.value_norm_beta) if self.value_norm else None


# -- the step's targets, computed once -------------------------------------------------------------------


def _split(flat: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return list(flat.split(lengths))


def policy_logprobs_of(batch: Batch) -> list[torch.Tensor]:
    """The behaviour policy's log-probs the targets and the ratio use: the recomputed training-path
    ones when there are, else the generation's."""
    return batch["old_logprobs"] if "old_logprobs" in batch else batch["gen_logprobs"]


@dataclass
class TargetsInterface(InferenceInterface):
    """The `rl_targets` MFC: per-token KL, shaped rewards, advantages and (GAE) returns of this rank's
    rows, whitened over the MFC's mesh, once per step for the actor and the critic alike; it owns
    the (adaptive) KL coefficient and the return normalisation, updated from step-wide statistics."""

    cfg: PolicyConfig
    group_size: int = 1
    group: object = None  # the process group of the MFC's mesh
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

    def inference(self, call, batch: Batch) -> Batch:
        cfg, kl_coef = self.cfg, self.kl.value
        lengths = [len(c) for c in batch["completion"]]
        policy = torch.cat(policy_logprobs_of(batch))
        kl = F.kl_estimate(policy, torch.cat(batch["ref_logprobs"]), cfg.kl_estimator) if "ref_logprobs" in batch \
            else torch.zeros_like(policy)
        clip = cfg.reward_clip or None
        scores = F.shape_scores(torch.tensor(batch["score"], dtype=torch.float32), clip, cfg.reward_scale,
                                cfg.reward_bias)
        out: Batch = {}
        if cfg.advantage == "gae":
            cu = torch.tensor([0] + lengths).cumsum(0)
            rewards = F.shape_rewards(scores, kl, cu, kl_coef if cfg.kl_in_reward else 0.0)
            values = torch.cat(batch["values"])
            if self.value_stats is not None:
                values = self.value_stats.denormalize(values)
            advantages, returns = F.gae_packed(rewards, values, cu, torch.tensor(batch["truncated"]), cfg.gamma,
                                               cfg.lam)
            if self.value_stats is not None:  # the critic regresses on normalised returns
                self.value_stats.update(returns, group=self.group)
                returns = self.value_stats.normalize(returns)
            out["returns"] = _split(returns, lengths)
        else:
            shaped = {**batch}
            if "greedy_score" in batch:
                shaped["shaped_greedy_score"] = F.shape_scores(torch.tensor(batch["greedy_score"], dtype=torch.float32),
                                                               clip, cfg.reward_scale, cfg.reward_bias)
            per_sequence = SEQUENCE_ADVANTAGES[cfg.advantage](scores, shaped, self.group_size)
            if cfg.kl_in_reward and kl_coef:
                per_sequence = per_sequence - kl_coef * torch.stack([k.sum() for k in _split(kl, lengths)])
            advantages = torch.cat([per_sequence[i].expand(n) for i, n in enumerate(lengths)])
        if cfg.whiten_advantages:
            advantages = F.whiten(advantages, group=self.group)
        # Ziegler's controller: the step's mean KL per sequence over its sequence count, on all ranks
        totals = torch.tensor([float(kl.sum()), float(len(lengths))], dtype=torch.float64)
        if self.group is not None:
            dist.all_reduce(totals, group=self.group)
        self.kl.update(float(totals[0] / totals[1].clamp(min=1)), int(totals[1]))
        out.update({"advantages": _split(advantages, lengths), "kl": _split(kl, lengths),
                    "kl_coef": [kl_coef] * len(lengths)})
        return out


# -- the policy's log-probs -------------------------------------------------


def _rows(batch: Batch, rows: list[int]) -> Batch:
    return {key: [values[i] for i in rows] for key, values in batch.items()}


def policy_logprobs(engine, rollouts: Rollouts, temperature: float = 1.0,
                     entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The policy's log-probs [B, K] of the last K tokens (the completions) at `temperature` - the
    definition generation and the reference share (`models.generate.Generation`) - and their
    entropies when asked, computing the LM head only where completions are (left padding puts them
    at the end)."""
    width = rollouts.max_actions
    device = engine.device
    out = engine(input_ids=rollouts.input_ids.to(device), attention_mask=rollouts.attention_mask.to(device),
                 position_ids=rollouts.positions.to(device), logits_to_keep=width + 1, use_cache=False)
    logits = out.logits / temperature if temperature != 1.0 else out.logits
    return F.next_token_logprobs(logits, rollouts.input_ids[:, -(width + 1):].to(device), entropy)


def critic_values(engine, rollouts: Rollouts) -> torch.Tensor:
    device = engine.device
    return engine(input_ids=rollouts.input_ids.to(device), attention_mask=rollouts.attention_mask.to(device),
                  position_ids=rollouts.positions.to(device))


@dataclass(frozen=True)
class PolicyLogprobsInterface(InferenceInterface):
    """`actor_logp`: the old policy's log-probs of the rollout from the actor's training engine, with
    the update's own micro-batches (so the same padding and kernels): the first ratio is exactly 1."""

    pad_id: int
    micro_batch_size: int
    minibatches: int
    temperature: float = 1.0

    def inference(self, engine, batch: Batch) -> Batch:
        out: list = [None] * len(batch["completion"])
        for micro in update_micro_batches(len(out), self.minibatches, self.micro_batch_size):
            rollouts = rollouts_of(_rows(batch, micro), self.pad_id)
            logprobs, _ = policy_logprobs(engine, rollouts, self.temperature)
            for row, values in zip(micro, rollouts.actions_of(logprobs.float().cpu())):
                out[row] = values
        return {"old_logprobs": out}


@dataclass(frozen=True)
class CriticValuesInterface(InferenceInterface):
    """`critic_values`: the critic's values of the rollout's states from its training engine, with the
    update's micro-batches, so the value clip is centred on what the first update computes."""

    pad_id: int
    micro_batch_size: int
    minibatches: int

    def inference(self, engine, batch: Batch) -> Batch:
        out: list = [None] * len(batch["completion"])
        for micro in update_micro_batches(len(out), self.minibatches, self.micro_batch_size):
            rollouts = rollouts_of(_rows(batch, micro), self.pad_id)
            for row, values in zip(micro, rollouts.states_of(critic_values(engine, rollouts).float().cpu())):
                out[row] = values
        return {"values": out}


def _any_rank(flag: bool, group) -> bool:
    tensor = torch.tensor([float(flag)])
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return bool(tensor.item())


def _action_units(lengths: list[int], mode: str):
    return lambda rows: float(F.loss_units(torch.tensor(lengths[rows]), mode))


# -- training --------------------------------------------------------------------------------------------


@dataclass
class PolicyTrainInterface(TrainInterface):
    """Clipped policy-gradient updates of the actor (PPO, GRPO, RLOO, ReMax differ in the advantage)."""

    cfg: PolicyConfig
    micro_batch_size: int
    pad_id: int
    temperature: float = 1.0  # the policy's (models.generate.policy_temperature)
    norm_tokens: int = 0  # rollout.max_new_tokens: seq-mean-token-sum-norm's constant divisor
    group: object = None  # the training mesh's process group (early stop)

    def train_step(self, engine, batch: Batch) -> Metrics:
        cfg = self.cfg
        lengths = [len(c) for c in batch["completion"]]
        metrics: Metrics = {}
        scores = torch.tensor(batch["score"], dtype=torch.float32)
        add_metric(metrics, "reward", float(scores.sum()), float(len(scores)))
        add_metric(metrics, "response_length", float(sum(lengths)), float(len(lengths)))
        add_metric(metrics, "truncated", float(sum(batch["truncated"])), float(len(lengths)))
        add_metric(metrics, "kl", float(torch.cat(batch["kl"]).sum()), float(sum(lengths)))
        add_metric(metrics, "kl_coef", float(batch["kl_coef"][0]), 1.0)
        if cfg.recompute:
            self._gap_metrics(metrics, batch["gen_logprobs"], batch["old_logprobs"])
        stopped = False
        for epoch in range(cfg.epochs):
            for minibatch in update_minibatches(len(lengths), cfg.minibatches):
                if stopped:
                    break
                part = _rows(batch, minibatch)
                step_metrics = train_micro_batches(engine, len(minibatch), self.micro_batch_size,
                                                   self._loss_of(engine, part, gap=epoch == 0 and not cfg.recompute),
                                                   _action_units([lengths[i] for i in minibatch], cfg.aggregation))
                for name, value in step_metrics.items():
                    add_metric(metrics, name, *value)
                approx_kl = step_metrics["approx_kl"][0] / max(step_metrics["approx_kl"][1], 1)
                stopped = bool(cfg.early_stop_kl) and _any_rank(approx_kl > cfg.early_stop_kl, self.group)
        add_metric(metrics, "early_stopped", float(stopped), 1.0)
        return metrics

    @staticmethod
    def _gap_metrics(metrics: Metrics, rollout: list[torch.Tensor], training: list[torch.Tensor]) -> None:
        """|rollout log-prob - training log-prob| over the completion tokens (absolute names: the
        runner does not prefix them with the role)."""
        gap = (torch.cat([r.float() for r in rollout]) - torch.cat([t.float().cpu() for t in training])).abs()
        add_metric(metrics, "rollout/logprob_gap_mean", float(gap.sum()), float(gap.numel()))
        add_metric(metrics, "rollout/logprob_gap_max", float(gap.max()) if gap.numel() else 0.0, MAX)

    def _loss_of(self, engine, batch: Batch, gap: bool):
        cfg, mode = self.cfg, self.cfg.aggregation
        old_logprobs = policy_logprobs_of(batch)

        def loss_of(rows: slice, metrics: Metrics):
            part = {key: values[rows] for key, values in batch.items()}
            rollouts = rollouts_of(part, self.pad_id)
            logprobs, entropies = policy_logprobs(engine, rollouts, self.temperature, entropy=bool(cfg.entropy_coef))
            width, device = rollouts.max_actions, logprobs.device
            mask = rollouts.action_mask().to(device)
            n = float(mask.sum())
            if gap:  # rollout mode: the training path's log-probs at their first forward
                self._gap_metrics(metrics, part["gen_logprobs"], rollouts.actions_of(logprobs.detach()))
            old = right_aligned(old_logprobs[rows], width).to(device)
            adv = right_aligned(part["advantages"], width).to(device)
            weights = None
            if cfg.tis_cap:
                rollout = right_aligned(part["gen_logprobs"], width).to(device)
                weights = torch.exp(old - rollout).clamp(max=cfg.tis_cap) * mask
                add_metric(metrics, "tis_weight", float(weights.sum()), n)
            loss, stats = F.ppo_policy_loss(logprobs, old, adv, mask, cfg.clip, mode, self.norm_tokens, weights)
            units = float(F.loss_units(mask.sum(-1).cpu(), mode))
            add_metric(metrics, "pg_loss", loss.item(), units)
            if not cfg.kl_in_reward and part["kl_coef"][0] and "ref_logprobs" in part:
                ref = right_aligned(part["ref_logprobs"], width).to(device)
                loss = loss + part["kl_coef"][0] * F.aggregate_sum(F.kl_estimate(logprobs, ref, cfg.kl_estimator),
                                                                   mask, mode, self.norm_tokens)
            if cfg.entropy_coef:
                entropy = F.aggregate_sum(entropies, mask, mode, self.norm_tokens)
                loss = loss - cfg.entropy_coef * entropy
                add_metric(metrics, "entropy", entropy.item(), units)
            for name, value in stats.items():
                add_metric(metrics, name, value, n)
            add_metric(metrics, "loss", loss.item(), units)
            return loss, float(rollouts.attention_mask.sum())

        return loss_of


@dataclass
class CriticTrainInterface(TrainInterface):
    """Regresses the critic's values on the step's returns (clipped around the old values)."""

    cfg: PolicyConfig
    micro_batch_size: int
    pad_id: int
    norm_tokens: int = 0

    def train_step(self, engine, batch: Batch) -> Metrics:
        lengths = [len(c) for c in batch["completion"]]
        old_values = [v[:-1] for v in batch["values"]]  # the states before each action
        metrics: Metrics = {}
        for _ in range(self.cfg.epochs):
            for minibatch in update_minibatches(len(lengths), self.cfg.minibatches):
                loss_of = self._loss_of(engine, _rows(batch, minibatch), [old_values[i] for i in minibatch])
                units = _action_units([lengths[i] for i in minibatch], self.cfg.aggregation)
                for name, value in train_micro_batches(engine, len(minibatch), self.micro_batch_size, loss_of,
                                                       units).items():
                    add_metric(metrics, name, *value)
        return metrics

    def _loss_of(self, engine, batch: Batch, old_values: list[torch.Tensor]):
        clip, mode = self.cfg.value_clip or None, self.cfg.aggregation

        def loss_of(rows: slice, metrics: Metrics):
            part = {key: values[rows] for key, values in batch.items()}
            rollouts = rollouts_of(part, self.pad_id)
            width = rollouts.max_actions
            values = critic_values(engine, rollouts)
            device = values.device
            predicted = values[:, -width - 1:-1]  # right-aligned: the state before each action
            mask = rollouts.action_mask().to(device)
            loss = F.value_loss(predicted, right_aligned(old_values[rows], width).to(device),
                                right_aligned(part["returns"], width).to(device), mask, clip, mode, self.norm_tokens)
            add_metric(metrics, "value_loss", loss.item(), float(F.loss_units(mask.sum(-1).cpu(), mode)))
            add_metric(metrics, "value", float((predicted.detach() * mask).sum()), float(mask.sum()))
            return loss, float(rollouts.attention_mask.sum())

        return loss_of


@dataclass
class RaftTrainInterface(TrainInterface):
    """RAFT: fine-tune on the best of each prompt's samples (when its score beats `threshold`); the
    loss is the token mean over every kept token of the step."""

    micro_batch_size: int
    pad_id: int
    group_size: int
    threshold: float = 0.0
    temperature: float = 1.0

    def train_step(self, engine, batch: Batch) -> Metrics:
        scores = torch.tensor(batch["score"], dtype=torch.float32).view(-1, self.group_size)
        best = scores.argmax(-1) + torch.arange(scores.shape[0]) * self.group_size
        chosen = _rows(batch, best.tolist())
        weights = (scores.max(-1).values > self.threshold).float()  # every rank runs the same forwards
        kept_tokens = [len(c) * float(w) for c, w in zip(chosen["completion"], weights)]
        metrics: Metrics = {}
        add_metric(metrics, "reward", float(scores.sum()), float(scores.numel()))
        add_metric(metrics, "best_reward", float(scores.max(-1).values.sum()), float(scores.shape[0]))
        add_metric(metrics, "kept", float(weights.sum()), float(len(weights)))

        def loss_of(rows: slice, metrics_: Metrics):
            part = {key: values[rows] for key, values in chosen.items()}
            rollouts = rollouts_of(part, self.pad_id)
            logprobs, _ = policy_logprobs(engine, rollouts, self.temperature)
            mask = rollouts.action_mask().to(logprobs.device) * weights[rows].to(logprobs.device).unsqueeze(-1)
            nll = -(logprobs * mask).sum()
            add_metric(metrics_, "loss", nll.item(), float(mask.sum()))
            return nll, float(rollouts.attention_mask.sum())

        for name, value in train_micro_batches(engine, len(best), self.micro_batch_size, loss_of,
                                               lambda rows: sum(kept_tokens[rows])).items():
            add_metric(metrics, name, *value)
        return metrics
