"""Allocations: defaults for any world size, and errors that name the MFC and field, before any work."""

import re

import pytest
from transformers import LlamaConfig

from ds_realloc.dataflow.allocation import AllocationConfig, resolve_allocations
from ds_realloc.dataflow.catalog import builtin_experiments
from ds_realloc.dataflow.mfc import topological_order
from ds_realloc.layout.model import model_spec
from ds_realloc.utils.errors import ConfigError

# 12 heads, 2 kv heads: t2 splits the kv heads, t4 replicates them, t3 fits neither
CONFIG = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=12,
                     num_key_value_heads=2, vocab_size=128)
MODELS = {"actor": model_spec(CONFIG), "ref": model_spec(CONFIG), "critic": model_spec(CONFIG, value_head=True)}


def _ppo(old_logprobs="recompute"):
    from ds_realloc.utils.config import load_config

    experiment = builtin_experiments()["ppo"]
    return topological_order(experiment.mfcs(load_config(experiment.config_cls, None,
                                                         [f"algo.old_logprobs={old_logprobs}"])))


def _resolve(world=4, rows=16, shorthand="", old_logprobs="recompute", **per_mfc):
    configs = {name: AllocationConfig(**fields) for name, fields in per_mfc.items()}
    return resolve_allocations(_ppo(old_logprobs), world, shorthand, configs, MODELS, rows)


def _placements(allocations):
    return {name: (a.mesh.ranks, a.strategy.dp, a.strategy.tp) for name, a in allocations.items()}


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6, 8])
def test_default_fits_any_world_and_splits_two_trainings(world):
    allocations = _resolve(world=world, rows=48)
    everyone = tuple(range(world))
    for a in allocations.values():
        if not a.mfc.kind.on_engine:
            assert a.mesh.ranks == everyone and (a.strategy.dp, a.strategy.tp) == (world, 1)
    actor, critic = allocations["actor_train"].mesh.ranks, allocations["critic_train"].mesh.ranks
    # the recompute runs on the engines it scores with
    assert allocations["actor_logp"].mesh.ranks == actor and allocations["critic_values"].mesh.ranks == critic
    if world % 2 == 0:  # halves: the two trainings overlap in time
        assert actor == everyone[:world // 2] and critic == everyone[world // 2:]
    else:
        assert actor == critic == everyone


def test_per_mfc_and_shorthand_allocations():
    allocations = _resolve(shorthand="d2t2", old_logprobs="rollout", actor_gen={"mesh": "0-3", "strategy": "d4"},
                           actor_train={"mesh": "0-1", "strategy": "zero3"},
                           critic_train={"mesh": "2-3"}, critic_inf={"mesh": "2-3", "strategy": "t2"})
    placed = _placements(allocations)
    assert placed["actor_gen"] == ((0, 1, 2, 3), 4, 1)
    assert placed["ref_inf"] == ((0, 1, 2, 3), 2, 2)  # the shorthand
    # calls without a model (a reward function, the RL targets) stay data parallel
    assert placed["rew_inf"] == ((0, 1, 2, 3), 4, 1) and placed["rl_targets"] == ((0, 1, 2, 3), 4, 1)
    assert placed["critic_inf"] == ((2, 3), 1, 2)
    assert placed["actor_train"][0] == (0, 1) and placed["critic_train"][0] == (2, 3)
    assert allocations["critic_inf"].dp_groups == ((2, 3),)
    assert _resolve(actor_gen={"strategy": "t4"})["actor_gen"].strategy.tp == 4  # kv heads replicated


def test_per_mfc_zero_stage_and_micro_batch_reach_the_engine_and_its_scoring_calls():
    allocations = _resolve(actor_train={"zero_stage": 2, "micro_batch_size": 2}, critic_train={"zero_stage": 1})
    actor, logp = allocations["actor_train"], allocations["actor_logp"]
    assert (actor.zero_stage, actor.micro_batch_size) == (2, 2) == (logp.zero_stage, logp.micro_batch_size)
    assert (allocations["critic_train"].zero_stage, allocations["critic_train"].micro_batch_size) == (1, None)
    assert allocations["actor_gen"].zero_stage is None  # unset: engine.zero_stage / train.micro_batch_size


def test_per_mfc_engine_settings_are_checked_against_the_run(tmp_path):
    """A plan checks a per-MFC micro-batch against the rows and a per-MFC stage against the engine settings."""
    from ds_realloc.dataflow.setup import plan_run
    from ds_realloc.utils.config import load_config

    experiment = builtin_experiments()["ppo"]

    def plan(*overrides):
        cfg = load_config(experiment.config_cls, None, ["model.path=tiny-llama",
                                                        *overrides])
        return plan_run(experiment, cfg, 2)

    assert plan("allocations.actor_train.micro_batch_size=4").allocations["actor_train"].micro_batch_size == 4
    with pytest.raises(ConfigError, match=re.escape("allocations.actor_train.micro_batch_size=3 x 1 data-parallel")):
        plan("allocations.actor_train.micro_batch_size=3")
    with pytest.raises(ConfigError, match=re.escape("allocations.critic_train.zero_stage=2: ")):
        plan("engine.offload_param=true", "allocations.critic_train.zero_stage=2")


@pytest.mark.parametrize("per_mfc, shorthand, message", [
    ({"actor_gen": {"mesh": "0-7"}}, "", "allocations.actor_gen.mesh: rank 4 is outside the world of 4 ranks"),
    ({"actor_gen": {"mesh": "0-2", "strategy": "t3"}}, "", "allocations.actor_gen.strategy: t3: tp=3 and "
                                                           "num_key_value_heads=2 do not divide one another"),
    ({}, "t3", "allocation (actor_gen): t3 needs 3 ranks, the mesh has 4"),
    ({"actor_gen": {"strategy": "d3"}}, "", "allocations.actor_gen.strategy"),
    ({"actor_train": {"mesh": "0-3", "strategy": "d2t2"}}, "", "allocations.actor_train.strategy: training runs DeepSpeed ZeRO"),
    ({"actor_gen": {"strategy": "zero3"}}, "", "allocations.actor_gen.strategy: generate calls run on d<dp>t<tp>"),
    ({"actor_trian": {"mesh": "0"}}, "", "allocations.actor_trian: there is no MFC 'actor_trian'"),
    ({"actor_logp": {"mesh": "0"}}, "", "allocations.actor_logp: actor_logp runs on the training engine of "
                                        "actor_train; set allocations.actor_train instead"),
    ({"rl_targets": {"strategy": "d2t2"}}, "", "allocations.rl_targets.strategy: rl_targets runs no model"),
    ({"actor_train": {"mesh": "0-3", "strategy": "d4e2"}}, "", "allocations.actor_train.strategy: training runs "
                                                               "DeepSpeed ZeRO"),
    ({"actor_gen": {"strategy": "d4e2"}}, "", "allocations.actor_gen.strategy: d4e2: strategy d4t1p1e2: expert "
                                              "parallelism (e2) needs a mixture-of-experts model; llama has no experts"),
    ({"actor_gen": {"strategy": "d4e3"}}, "", "allocations.actor_gen.strategy: in 'd4e3' the expert-parallel "
                                              "degree e3 must divide d4"),
    ({"actor_gen": {"zero_stage": 2}}, "", "allocations.actor_gen.zero_stage: only training MFCs run a DeepSpeed"),
    ({"ref_inf": {"micro_batch_size": 2}}, "", "allocations.ref_inf.micro_batch_size: only training MFCs"),
    ({"actor_train": {"zero_stage": 4}}, "", "allocations.actor_train.zero_stage: must be 0, 1, 2 or 3"),
    ({"actor_train": {"micro_batch_size": -1}}, "", "allocations.actor_train.micro_batch_size: must be at least 1"),
])
def test_bad_allocations_name_the_mfc_and_field(per_mfc, shorthand, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _resolve(shorthand=shorthand, **per_mfc)


def test_rows_that_do_not_split_over_the_groups():
    with pytest.raises(ConfigError, match="allocations.actor_gen: 4 data-parallel groups do not divide the 6 samples"):
        _resolve(rows=6)
