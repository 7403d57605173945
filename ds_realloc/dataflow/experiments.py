"""Experiments: a config tree, the model roles, the MFC graph and the interface of every MFC.

Adding an algorithm means adding an entry here (its MFCs and interfaces); the runner is shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from ds_realloc.algorithms.dpo import DPOInterface
from ds_realloc.algorithms.rm import RewardModelInterface
from ds_realloc.algorithms.sft import SFTInterface
from ds_realloc.data.tasks import Format
from ds_realloc.dataflow.config import RunConfig
from ds_realloc.dataflow.mfc import MFC, MFCKind
from ds_realloc.engine.config import OptimConfig
from ds_realloc.models.registry import Head
from ds_realloc.utils.config import invalid, option


@dataclass(frozen=True)
class RoleSpec:
    """A model of the experiment: where its weights come from, its head, and whether it is trained."""

    role: str
    path: str
    path_field: str  # the config field that named the path, for error messages
    head: Head
    trainable: bool
    offload: bool = False  # frozen models: keep weights on CPU while idle
    optim: OptimConfig | None = None  # trained models: the optimizer (default: the config's `optim`)


@dataclass(frozen=True)
class InterfaceContext:
    """What interfaces are built with besides the config."""

    tokenizer: Any
    pad_id: int
    eos_ids: tuple[int, ...]
    groups: dict[str, Any] = field(default_factory=dict)  # MFC name -> process group of its role's mesh


@dataclass(frozen=True)
class Experiment:
    command: str
    summary: str
    config_cls: type
    data_format: Format  # record format of the dataset: sft, pairs or prompts
    sample_key: str  # batch key holding the dataset samples
    mfcs: Callable[[Any], tuple[MFC, ...]]
    roles: Callable[[Any], list[RoleSpec]]
    interfaces: Callable[[Any, InterfaceContext], dict[str, Any]]  # interface per MFC name
    samples_per_prompt: Callable[[Any], int] = lambda cfg: 1
    optimizer_steps_per_step: Callable[[Any], int] = lambda cfg: 1
    evaluation: Literal["interfaces", "generation"] = "interfaces"
    table: tuple[tuple[str, str], ...] = ()  # (label, metric) columns of the per-step table
    group_train_rows: bool = False  # a training rank must hold all samples of each of its prompts


# ----------------------------------------------------------------------------------------------
# SFT


@dataclass
class SFTConfig(RunConfig):
    optim: OptimConfig = option(OptimConfig(lr=2e-5), "optimizer and learning-rate schedule")


SFT = Experiment(
    command="sft",
    summary="supervised fine-tuning: cross-entropy on answer tokens",
    config_cls=SFTConfig,
    data_format="sft",
    sample_key="seq",
    mfcs=lambda cfg: (MFC("actor_train", "actor", MFCKind.TRAIN, ("seq",)),),
    roles=lambda cfg: [RoleSpec("actor", cfg.model.path, "model.path", "lm", trainable=True)],
    interfaces=lambda cfg, ctx: {"actor_train": SFTInterface(cfg.train.micro_batch_size, ctx.pad_id)},
    table=(("loss", "actor/loss"), ("eval_loss", "eval/actor/loss")),
)


# ----------------------------------------------------------------------------------------------
# Reward model


@dataclass
class RMConfig(RunConfig):
    optim: OptimConfig = option(OptimConfig(lr=2e-5), "optimizer and learning-rate schedule")


RM = Experiment(
    command="rm",
    summary="reward model: Bradley-Terry loss on preference pairs, scalar head on the last token",
    config_cls=RMConfig,
    data_format="pairs",
    sample_key="pair",
    mfcs=lambda cfg: (MFC("reward_train", "reward", MFCKind.TRAIN, ("pair",)),),
    roles=lambda cfg: [RoleSpec("reward", cfg.model.path, "model.path", "value", trainable=True)],
    interfaces=lambda cfg, ctx: {"reward_train": RewardModelInterface(cfg.train.micro_batch_size, ctx.pad_id)},
    table=(("loss", "reward/loss"), ("accuracy", "reward/accuracy"), ("eval_acc", "eval/reward/accuracy")),
)


# ----------------------------------------------------------------------------------------------
# DPO


@dataclass
class RefConfig:
    path: str = option("", "the reference model; '' = the same weights as model.path")
    offload: bool = option(True, "keep the reference model's weights on CPU while it is not computing")
    ema: float = option(0.0, "after every step, ref = ema x actor + (1 - ema) x ref, moved from the actor's "
                             "partitions by reallocation (0 = a fixed reference)")

    def validate(self) -> None:
        if not 0.0 <= self.ema <= 1.0:
            raise invalid("ema", f"must be in [0, 1], got {self.ema}")


@dataclass
class DPOParams:
    beta: float = option(0.1, "DPO temperature: implicit reward = beta * (log pi - log ref)")

    def validate(self) -> None:
        if self.beta <= 0:
            raise invalid("beta", f"must be positive, got {self.beta}")


@dataclass
class DPOConfig(RunConfig):
    optim: OptimConfig = option(OptimConfig(lr=5e-6), "optimizer and learning-rate schedule")
    ref: RefConfig = option(RefConfig(), "the frozen reference model")
    dpo: DPOParams = option(DPOParams(), "DPO hyper-parameters")


_PAIR_LOGPS = ("ref_chosen_logp", "ref_rejected_logp")

DPO = Experiment(
    command="dpo",
    summary="direct preference optimisation (sigmoid loss) against a frozen reference model",
    config_cls=DPOConfig,
    data_format="pairs",
    sample_key="pair",
    mfcs=lambda cfg: (
        MFC("ref_inf", "ref", MFCKind.INFERENCE, ("pair",), _PAIR_LOGPS),
        MFC("actor_train", "actor", MFCKind.TRAIN, ("pair", *_PAIR_LOGPS)),
    ),
    roles=lambda cfg: [
        RoleSpec("actor", cfg.model.path, "model.path", "lm", trainable=True),
        RoleSpec("ref", cfg.ref.path or cfg.model.path, "ref.path" if cfg.ref.path else "model.path", "lm",
                 trainable=False, offload=cfg.ref.offload),
    ],
    interfaces=lambda cfg, ctx: dict.fromkeys(("ref_inf", "actor_train"),
                                              DPOInterface(cfg.train.micro_batch_size, ctx.pad_id, cfg.dpo.beta)),
    table=(("loss", "actor/loss"), ("reward_acc", "actor/reward_accuracy"), ("margin", "actor/reward_margin"),
           ("eval_acc", "eval/actor/reward_accuracy")),
)


def all_experiments() -> dict[str, Experiment]:
    from ds_realloc.dataflow.rlhf import RL_EXPERIMENTS

    return {e.command: e for e in (SFT, RM, DPO, *RL_EXPERIMENTS)}
