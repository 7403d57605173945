"""RLHF commands: PPO, GRPO, RLOO, ReMax and RAFT as MFC graphs over the same runner.

PPO: actor_gen -> {rew_inf, ref_inf, actor_logp, critic_values} -> rl_targets -> {actor_train,
critic_train} (with algo.old_logprobs=rollout: no actor_logp, and critic_inf on its own layout
instead of critic_values). GRPO and RLOO drop the critic and sample several completions per
prompt; ReMax adds a greedy generation and its reward as the baseline; RAFT fine-tunes on the best
of several samples. Every call can run on its own mesh and layout (`allocations`); the actor's
weights are reallocated from its ZeRO-3 training partitions into the generation layout at every
step; `rl_targets` (no model) computes the step's advantages once for every training call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_realloc.algorithms.geometry import StepGeometry
from ds_realloc.algorithms.policy import (CriticTrainInterface, CriticValuesInterface, PolicyConfig,
                                         PolicyLogprobsInterface, PolicyTrainInterface, RaftTrainInterface,
                                         TargetsInterface)
from ds_realloc.algorithms.rollout import (GenerateInterface, LogprobsInterface, RewardFunctionInterface,
                                           RewardModelInterface, ValuesInterface)
from ds_realloc.data.rewards import load_reward_function
from ds_realloc.dataflow.config import RefConfig, RunConfig, TrainConfig
from ds_realloc.dataflow.experiment import Experiment, InterfaceContext, RoleSpec, RunSettings, register
from ds_realloc.dataflow.mfc import MFC, MFCKind
from ds_realloc.engine.config import OptimConfig
from ds_realloc.models.generate import GenerationConfig, policy_temperature, sampling_of
from ds_realloc.utils.config import invalid, option

G, I, T = MFCKind.GENERATE, MFCKind.INFERENCE, MFCKind.TRAIN


@dataclass
class RolloutConfig(GenerationConfig):
    """Sampling of the training completions, and greedy evaluation on the held-out prompts."""

    max_new_tokens: int = option(16, "tokens to generate at most per completion")
    samples_per_prompt: int = option(1, "completions sampled per prompt (a group, for GRPO / RLOO / RAFT)")
    eval_max_new_tokens: int = option(16, "tokens per greedy completion in evaluation")
    eval_prompts: int = option(64, "held-out prompts evaluated before and after training (0 = all)")
    offload_train_states: bool = option(False, "during generation, move the trained models' optimizer states, "
                                               "fp32 master weights and gradients to CPU (DeepSpeed offload_states "
                                               "/ reload_states; ZeRO-3 on GPU without engine offload)")

    def validate(self) -> None:
        super().validate()
        if self.samples_per_prompt < 1:
            raise invalid("samples_per_prompt", "must be at least 1")


@dataclass
class CriticConfig:
    path: str = option("", "the critic's initial weights: '' = the actor's, with a new value head")
    optim: OptimConfig = option(OptimConfig(lr=5e-5), "the critic's optimizer")


@dataclass
class RewardConfig:
    function: str = option("ds_realloc.data.rewards:final_number_matches",
                           "module:function(prompts, completions, **fields) -> list[float] scoring completions")
    model: str = option("", "a reward model folder (e.g. from ds-realloc rm) to score with instead of the function")
    offload: bool = option(True, "keep the reward model's weights on CPU while it is not scoring")


@dataclass
class RLConfig(RunConfig):
    train: TrainConfig = option(TrainConfig(micro_batch_size=8), "batching and schedule (batch_size counts prompts)")
    optim: OptimConfig = option(OptimConfig(lr=2e-5, min_lr_ratio=1.0), "the actor's optimizer")
    ref: RefConfig = option(RefConfig(offload=False), "the frozen reference policy (KL penalty)")
    critic: CriticConfig = option(CriticConfig(), "the critic (PPO)")
    reward: RewardConfig = option(RewardConfig(), "how completions are scored")
    rollout: RolloutConfig = option(RolloutConfig(), "sampling and evaluation")
    algo: PolicyConfig = option(PolicyConfig(), "the policy-gradient algorithm")

    def validate(self) -> None:
        if self.train.batch_size < 1:
            raise invalid("train.batch_size", "must be at least 1")
        if not self.reward.model:
            load_reward_function(self.reward.function)  # importable, with the right signature
        if self.rollout.offload_train_states:
            engine = self.engine
            if not torch.cuda.is_available():
                raise invalid("rollout.offload_train_states", "moves GPU states to CPU; this machine has no GPU")
            if engine.zero_stage != 3 or engine.offload_optimizer or engine.offload_param:
                raise invalid("rollout.offload_train_states", "needs engine.zero_stage=3 without "
                                                              "offload_optimizer / offload_param")


def _roles(cfg: RLConfig, critic: bool, reference: bool) -> list[RoleSpec]:
    roles = [RoleSpec("actor", cfg.model.path, "model.path", "lm", trainable=True, optim=cfg.optim)]
    if critic:
        roles.append(RoleSpec("critic", cfg.critic.path or cfg.model.path, "critic.path" if cfg.critic.path else
                              "model.path", "value", trainable=True, optim=cfg.critic.optim))
    if reference:
        roles.append(RoleSpec("ref", cfg.ref.path or cfg.model.path, "ref.path" if cfg.ref.path else "model.path",
                              "lm", trainable=False, offload=cfg.ref.offload))
    if cfg.reward.model:
        roles.append(RoleSpec("reward", cfg.reward.model, "reward.model", "value", trainable=False,
                              offload=cfg.reward.offload))
    return roles


_ROLLOUT = ("prompt", "completion", "gen_logprobs", "truncated", "score")
_TARGETS = ("advantages", "kl", "kl_coef")
S = MFCKind.SCORE


def _uses_reference(cfg: RLConfig) -> bool:
    return cfg.algo.kl_coef > 0


def _generation(cfg: RLConfig, greedy: bool = False) -> GenerationConfig:
    return sampling_of(cfg.rollout, greedy=greedy or cfg.rollout.greedy)


def _geometry(cfg: RLConfig) -> StepGeometry:
    return StepGeometry(cfg.train.batch_size, cfg.train.micro_batch_size, cfg.rollout.samples_per_prompt,
                        cfg.algo.minibatches, cfg.algo.epochs)


def _settings(cfg: RLConfig) -> RunSettings:
    return RunSettings(_geometry(cfg), reference_ema=cfg.ref.ema, offload_train_states=cfg.rollout.offload_train_states,
                       eval_prompts=cfg.rollout.eval_prompts, eval_max_new_tokens=cfg.rollout.eval_max_new_tokens)


def _temperature(cfg: RLConfig) -> float:
    """The policy's temperature: one value for generation, the reference, the recompute and training."""
    return policy_temperature(_generation(cfg))


def _reward(cfg: RLConfig, ctx: InterfaceContext, completion_key: str = "completion", output: str = "score"):
    if cfg.reward.model:
        return RewardModelInterface(ctx.pad_id, completion_key, output)
    return RewardFunctionInterface(load_reward_function(cfg.reward.function), ctx.tokenizer, cfg.reward.function,
                                   completion_key, output)


def _sampling_mfcs(cfg: RLConfig) -> list[MFC]:
    mfcs = [MFC("actor_gen", "actor", G, ("prompt",), ("completion", "gen_logprobs", "truncated")),
            MFC("rew_inf", "reward", I, ("prompt", "completion"), ("score",))]
    if _uses_reference(cfg):
        mfcs.append(MFC("ref_inf", "ref", I, ("prompt", "completion"), ("ref_logprobs",)))
    return mfcs


def _policy_mfcs(cfg: RLConfig, critic: bool = False, extra_scores: tuple[str, ...] = ()) -> list[MFC]:
    """What every policy-gradient step has after sampling: the recompute of the old log-probs (and
    values), the critic's values, the step's targets computed once, and the actor's update."""
    recompute = cfg.algo.recompute
    mfcs = []
    if recompute:
        mfcs.append(MFC("actor_logp", "actor", S, ("prompt", "completion"), ("old_logprobs",)))
    if critic:
        mfcs.append(MFC("critic_values", "critic", S, ("prompt", "completion"), ("values",)) if recompute else
                    MFC("critic_inf", "critic", I, ("prompt", "completion"), ("values",)))
    policy = ("gen_logprobs", *(("old_logprobs",) if recompute else ()))
    reference = ("ref_logprobs",) if _uses_reference(cfg) else ()
    mfcs.append(MFC("rl_targets", "targets", I,
                    ("completion", *policy, "truncated", "score", *reference, *(("values",) if critic else ()),
                     *extra_scores),
                    (*_TARGETS, *(("returns",) if cfg.algo.advantage == "gae" else ())), whole_groups=True))
    loss_reference = reference if not cfg.algo.kl_in_reward else ()
    mfcs.append(MFC("actor_train", "actor", T, (*_ROLLOUT, *policy[1:], *_TARGETS, *loss_reference)))
    if critic:
        mfcs.append(MFC("critic_train", "critic", T, ("prompt", "completion", "values", "returns")))
    return mfcs


def _policy_interfaces(cfg: RLConfig, ctx: InterfaceContext) -> dict:
    algo, geometry, temperature = cfg.algo, _geometry(cfg), _temperature(cfg)
    micro = ctx.micro_batch("actor_train", geometry.micro_batch_size)
    return {"actor_gen": GenerateInterface(_generation(cfg), ctx.eos_ids, ctx.pad_id),
            "rew_inf": _reward(cfg, ctx), "ref_inf": LogprobsInterface(ctx.pad_id, temperature),
            "actor_logp": PolicyLogprobsInterface(ctx.pad_id, micro, geometry.minibatches, temperature),
            "rl_targets": TargetsInterface(algo, cfg.rollout.samples_per_prompt, ctx.groups.get("rl_targets")),
            "actor_train": PolicyTrainInterface(algo, micro, ctx.pad_id, temperature, cfg.rollout.max_new_tokens,
                                                ctx.groups.get("actor_train"))}


# -- PPO -------------------------------------------------------------------------------------------------


@dataclass
class PPOConfig(RLConfig):
    pass


def _ppo_mfcs(cfg: RLConfig) -> tuple[MFC, ...]:
    return (*_sampling_mfcs(cfg), *_policy_mfcs(cfg, critic=True))


def _ppo_interfaces(cfg: RLConfig, ctx: InterfaceContext) -> dict:
    geometry = _geometry(cfg)
    micro = ctx.micro_batch("critic_train", geometry.micro_batch_size)
    return {**_policy_interfaces(cfg, ctx), "critic_inf": ValuesInterface(ctx.pad_id),
            "critic_values": CriticValuesInterface(ctx.pad_id, micro, geometry.minibatches),
            "critic_train": CriticTrainInterface(cfg.algo, micro, ctx.pad_id, cfg.rollout.max_new_tokens)}


_TABLE = (("reward", "actor/reward"), ("kl", "actor/kl"), ("length", "actor/response_length"),
          ("eval_acc", "eval/accuracy"))


def _rl_experiment(command: str, summary: str, config_cls: type, mfcs, interfaces, critic: bool,
                   table=_TABLE, group_rows: bool = False) -> Experiment:
    return register(Experiment(
        command=command, summary=summary, config_cls=config_cls, data_format="prompts", sample_key="prompt",
        mfcs=mfcs, roles=lambda cfg: _roles(cfg, critic, _uses_reference(cfg)), interfaces=interfaces,
        settings=_settings, evaluation="generation", table=table, group_train_rows=group_rows))


PPO = _rl_experiment("ppo", "PPO with a critic (GAE), KL penalty to the reference; the main job",
                     PPOConfig, _ppo_mfcs, _ppo_interfaces, critic=True,
                     table=(*_TABLE, ("value_loss", "critic/value_loss")))


# 4 prompts x 4 samples = 16 sequences a step, like PPO's 16 prompts x 1
_GROUP_TRAIN = TrainConfig(batch_size=4, micro_batch_size=8, max_steps=30)

# -- GRPO / RLOO -----------------------------------------------------------------------------------------


@dataclass
class GRPOConfig(RLConfig):
    train: TrainConfig = option(_GROUP_TRAIN, "batching and schedule (batch_size counts prompts)")
    rollout: RolloutConfig = option(RolloutConfig(samples_per_prompt=4), "sampling and evaluation")
    algo: PolicyConfig = option(PolicyConfig(advantage="grpo", kl_in_reward=False, kl_estimator="k3",
                                             whiten_advantages=False), "the policy-gradient algorithm")


def _group_mfcs(cfg: RLConfig) -> tuple[MFC, ...]:
    return (*_sampling_mfcs(cfg), *_policy_mfcs(cfg))


GRPO = _rl_experiment("grpo", "GRPO: group-normalised advantages over several samples per prompt, no critic",
                      GRPOConfig, _group_mfcs, _policy_interfaces, critic=False, group_rows=True)


@dataclass
class RLOOConfig(RLConfig):
    train: TrainConfig = option(_GROUP_TRAIN, "batching and schedule (batch_size counts prompts)")
    rollout: RolloutConfig = option(RolloutConfig(samples_per_prompt=4), "sampling and evaluation")
    algo: PolicyConfig = option(PolicyConfig(advantage="rloo", whiten_advantages=False),
                                "the policy-gradient algorithm")


RLOO = _rl_experiment("rloo", "RLOO: REINFORCE with a leave-one-out baseline over several samples per prompt",
                      RLOOConfig, _group_mfcs, _policy_interfaces, critic=False, group_rows=True)


# -- ReMax -----------------------------------------------------------------------------------------------


@dataclass
class ReMaxConfig(RLConfig):
    algo: PolicyConfig = option(PolicyConfig(advantage="remax", whiten_advantages=False),
                                "the policy-gradient algorithm")


def _remax_mfcs(cfg: RLConfig) -> tuple[MFC, ...]:
    return (*_sampling_mfcs(cfg),
            MFC("actor_greedy_gen", "actor", G, ("prompt",),
                ("greedy_completion", "greedy_logprobs", "greedy_truncated")),
            MFC("rew_greedy_inf", "reward", I, ("prompt", "greedy_completion"), ("greedy_score",)),
            *_policy_mfcs(cfg, extra_scores=("greedy_score",)))


def _remax_interfaces(cfg: RLConfig, ctx: InterfaceContext) -> dict:
    return {**_policy_interfaces(cfg, ctx),
            "actor_greedy_gen": GenerateInterface(_generation(cfg, greedy=True), ctx.eos_ids, ctx.pad_id,
                                                  ("greedy_completion", "greedy_logprobs", "greedy_truncated")),
            "rew_greedy_inf": _reward(cfg, ctx, "greedy_completion", "greedy_score")}


REMAX = _rl_experiment("remax", "ReMax: REINFORCE with the greedy completion's reward as the baseline",
                       ReMaxConfig, _remax_mfcs, _remax_interfaces, critic=False)


# -- RAFT ------------------------------------------------------------------------------------------------


@dataclass
class RAFTConfig(RLConfig):
    train: TrainConfig = option(_GROUP_TRAIN, "batching and schedule (batch_size counts prompts)")
    rollout: RolloutConfig = option(RolloutConfig(samples_per_prompt=4), "sampling and evaluation")
    algo: PolicyConfig = option(PolicyConfig(kl_coef=0.0), "kl_coef > 0 adds a reference model (unused by RAFT)")


def _raft_mfcs(cfg: RLConfig) -> tuple[MFC, ...]:
    return (*_sampling_mfcs(cfg), MFC("actor_train", "actor", T, ("prompt", "completion", "score")))


def _raft_interfaces(cfg: RLConfig, ctx: InterfaceContext) -> dict:
    temperature = _temperature(cfg)
    return {"actor_gen": GenerateInterface(_generation(cfg), ctx.eos_ids, ctx.pad_id), "rew_inf": _reward(cfg, ctx),
            "ref_inf": LogprobsInterface(ctx.pad_id, temperature),
            "actor_train": RaftTrainInterface(ctx.micro_batch("actor_train", cfg.train.micro_batch_size), ctx.pad_id, cfg.rollout.samples_per_prompt,
                                              temperature=temperature)}


RAFT = _rl_experiment("raft", "RAFT: reward-ranked fine-tuning on the best of several samples per prompt",
                      RAFTConfig, _raft_mfcs, _raft_interfaces, critic=False,
                      table=(("reward", "actor/reward"), ("best", "actor/best_reward"), ("eval_acc", "eval/accuracy")),
                      group_rows=True)

RL_EXPERIMENTS = (PPO, GRPO, RLOO, REMAX, RAFT)
