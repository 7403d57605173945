"""allocation=auto: the planner's plan applied under what was set by hand, cached by its inputs, planned
on a fake profile end to end (no processes); and the figures `bench planner` judges the planner by."""

import json

import pytest

from ds_realloc.bench.planner import kendall_tau, model_ranks, pooled_tau, summarise
from ds_realloc.dataflow.catalog import find_experiment
from ds_realloc.planner import auto
from ds_realloc.planner.profile import BUILTIN
from ds_realloc.utils.config import load_config

PPO = find_experiment("ppo")


def _cfg(*overrides):
    return load_config(PPO.config_cls, None, ["model.path=tiny-llama", "allocation=auto", *overrides])


@pytest.fixture
def fake_machine(tmp_path, monkeypatch):
    """This machine's cached profile: a fake one (4 GB devices, 2 per node)."""
    monkeypatch.setenv("DS_REALLOC_CACHE", str(tmp_path))
    monkeypatch.setattr(auto, "_builtin_for_this_gpu", lambda: None)
    path = auto.machine_profile_path(2)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(dict(BUILTIN["a100"].to_json(), name="fake", gpus_per_node=2, memory_bytes=4 * 10**9)))
    return path


def test_the_plan_fills_what_is_not_set_by_hand_and_resolves_as_a_config(fake_machine, monkeypatch):
    from ds_realloc.planner import measure_calls

    monkeypatch.setattr(measure_calls, "measure_model", lambda cfg, path: {})  # no timing: the roofline plans
    cfg = _cfg("allocations.actor_train.mesh=0-1")
    report = auto.plan_for(PPO, cfg, 2)
    assert report["fixed_by_config"] == ["actor_train"] and report["device"] == "fake"
    planned, sources = auto.apply_plan(cfg, report)
    assert planned.allocation == "" and sources["actor_train"] == "allocations.actor_train (set by hand)"
    assert planned.allocations["actor_train"].mesh == "0-1"  # as set, not the plan's
    assert sources["actor_gen"] == "the planner" and planned.allocations["actor_gen"].strategy
    from ds_realloc.dataflow.setup import plan_run

    resolved = plan_run(PPO, planned, 2).allocations
    chosen = report["allocations"]["critic_train"]
    assert resolved["critic_train"].zero_stage == chosen["zero_stage"]
    assert str(resolved["critic_train"].mesh) == chosen["mesh"]
    # cached: the same inputs give the same file; another world another key
    assert auto.plan_for(PPO, cfg, 2) == report
    profile = auto.machine_profile(PPO, cfg, 2)
    assert auto.plan_key(PPO, cfg, 2, profile) != auto.plan_key(PPO, cfg, 4, profile)
    assert auto.plan_key(PPO, cfg, 2, profile) == auto.plan_key(PPO, _cfg("allocations.actor_train.mesh=0-1",
                                                                          "output.dir=elsewhere"), 2, profile)


def test_kendall_tau_and_the_summary_of_a_bench():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0 and kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)

    def row(command, name, predicted_s, measured_s, mfc=(1.0, 1.0), memory=(100, 100)):
        # rank 1 runs only rl_targets (no model): 1 MiB measured against 0 predicted is left out
        return {"command": command, "name": name,
                "predicted": {"step_s": predicted_s, "mfc_s": {"actor_gen": mfc[0], "rl_targets": 0.0},
                              "memory_above_start_bytes": [memory[0], 0]},
                "measured": {"step_s": measured_s, "samples_per_s": 16 / measured_s,
                             "mfc_s": {"actor_gen": mfc[1], "rl_targets": 0.01},
                             "memory_above_start_bytes": [memory[1], 2 ** 20],
                             "allocations": {"actor_gen": "d1t1@[0]", "rl_targets": "d2t1@[0-1]"}}}

    rows = [row("ppo", "default", 1.0, 10.0, (1.2, 1.0)), row("ppo", "auto", 0.5, 8.0, (0.9, 1.0), (130, 100)),
            row("ppo", "slow", 2.0, 20.0), row("grpo", "default", 1.0, 5.0), row("grpo", "auto", 2.0, 4.0)]
    assert model_ranks(rows[0]["measured"]["allocations"], {"actor_gen"}) == {0}
    summary = summarise(rows, {"ppo": {"actor_gen"}, "grpo": {"actor_gen"}})
    assert pooled_tau(rows) == pytest.approx((1.0 * 3 + -1.0 * 1) / 4)  # pairs within a command only
    assert summary["median_mfc_error"] == pytest.approx(0.0)  # 0.2, 0.1, 0, 0, 0: rl_targets runs no model
    assert summary["memory_max_error"] == pytest.approx(0.3)
    assert summary["per_command"]["ppo"]["chosen_over_best"] == 1.0
    assert summary["per_command"]["ppo"]["auto_over_default"] == pytest.approx(10 / 8)
    assert summary["per_command"]["grpo"]["chosen_over_best"] == 1.0 and summary["chosen_over_best"] == 1.0
