"""The supervised experiments: SFT, the reward model and DPO (each registers itself; RL is in rlhf.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ds_realloc.algorithms.dpo import DPOInterface
from ds_realloc.algorithms.rm import RewardModelInterface
from ds_realloc.algorithms.sft import SFTInterface
from ds_realloc.algorithms.geometry import StepGeometry
from ds_realloc.dataflow.config import RefConfig, RunConfig
from ds_realloc.dataflow.experiment import Experiment, RoleSpec, RunSettings, register
from ds_realloc.dataflow.mfc import MFC, MFCKind
from ds_realloc.engine.config import OptimConfig
from ds_realloc.utils.config import invalid, option


# ----------------------------------------------------------------------------------------------
# SFT


@dataclass
class SFTConfig(RunConfig):
    optim: OptimConfig = option(OptimConfig(lr=2e-5), "optimizer and learning-rate schedule")


SFT = register(Experiment(
    command="sft",
    summary="supervised fine-tuning: cross-entropy on answer tokens",
    config_cls=SFTConfig,
    data_format="sft",
    sample_key="seq",
    mfcs=lambda cfg: (MFC("actor_train", "actor", MFCKind.TRAIN, ("seq",)),),
    roles=lambda cfg: [RoleSpec("actor", cfg.model.path, "model.path", "lm", trainable=True)],
    interfaces=lambda cfg, ctx: {
        "actor_train": SFTInterface(ctx.micro_batch("actor_train", cfg.train.micro_batch_size), ctx.pad_id)},
    table=(("loss", "actor/loss"), ("eval_loss", "eval/actor/loss")),
))


# ----------------------------------------------------------------------------------------------
# Reward model


@dataclass
class RMConfig(RunConfig):
    optim: OptimConfig = option(OptimConfig(lr=2e-5), "optimizer and learning-rate schedule")


RM = register(Experiment(
    command="rm",
    summary="reward model: Bradley-Terry loss on preference pairs, scalar head on the last token",
    config_cls=RMConfig,
    data_format="pairs",
    sample_key="pair",
    mfcs=lambda cfg: (MFC("reward_train", "reward", MFCKind.TRAIN, ("pair",)),),
    roles=lambda cfg: [RoleSpec("reward", cfg.model.path, "model.path", "value", trainable=True)],
    interfaces=lambda cfg, ctx: {"reward_train": RewardModelInterface(
        ctx.micro_batch("reward_train", cfg.train.micro_batch_size), ctx.pad_id)},
    table=(("loss", "reward/loss"), ("accuracy", "reward/accuracy"), ("eval_acc", "eval/reward/accuracy")),
))


# ----------------------------------------------------------------------------------------------
# DPO


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

DPO = register(Experiment(
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
    interfaces=lambda cfg, ctx: dict.fromkeys(("ref_inf", "actor_train"), DPOInterface(
        ctx.micro_batch("actor_train", cfg.train.micro_batch_size), ctx.pad_id, cfg.dpo.beta)),
    settings=lambda cfg: RunSettings(StepGeometry(cfg.train.batch_size, cfg.train.micro_batch_size),
                                     reference_ema=cfg.ref.ema),
    table=(("loss", "actor/loss"), ("reward_acc", "actor/reward_accuracy"), ("margin", "actor/reward_margin"),
           ("eval_acc", "eval/actor/reward_accuracy")),
))

