"""`ds-realloc plan` end to end on a fake profile and named model sizes (no processes, no weights)."""

import json
import re

import pytest

from ds_realloc.cli import main as cli_main
from ds_realloc.planner.report import openrlhf_meshes


def main(argv) -> int:
    with pytest.raises(SystemExit) as done:
        cli_main(argv)
    return done.value.code


def test_plan_prints_allocations_predictions_and_baselines(capsys, tmp_path):
    profile = tmp_path / "fake.json"
    from ds_realloc.planner.profile import BUILTIN

    profile.write_text(json.dumps(dict(BUILTIN["h100"].to_json(), name="fake", gpus_per_node=4)))
    assert main(["plan", "ppo", "model.path=llama-7b", "critic.path=llama-7b", "world=4", f"device={profile}",
                 "iterations=1500", "train.batch_size=32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "fake" and report["world"] == 4 and report["models"]["actor"] == 6_738_415_616
    assert set(report["allocations"]) == {"actor_gen", "rew_inf", "ref_inf", "critic_inf", "rl_targets",
                                          "actor_train", "critic_train"}
    # the allocations are a config's: they resolve as written (the runner's own checks)
    from ds_realloc.dataflow.catalog import find_experiment
    from ds_realloc.dataflow.setup import plan_run
    from ds_realloc.utils.config import load_config

    overrides = [f"allocations.{mfc}.{key}={value}" for mfc, entry in report["allocations"].items()
                 for key, value in entry.items()]
    ppo = find_experiment("ppo")
    cfg = load_config(ppo.config_cls, None, ["model.path=llama-7b", "critic.path=llama-7b", "train.batch_size=32",
                                             *overrides])
    resolved = plan_run(ppo, cfg, 4, weights_free=True).allocations
    assert {name: str(a.mesh) for name, a in resolved.items() if name in report["allocations"]} == \
        {name: entry["mesh"] for name, entry in report["allocations"].items()}
    assert max(report["predicted_peak_bytes_per_rank"]) <= BUILTIN["h100"].memory_bytes
    assert set(report["baselines"]) == {"deepspeed_chat", "openrlhf", "default"} and report["search_s"] > 0
    for name, seconds in report["baselines"].items():  # the planner never predicts worse than a plan it could pick
        assert seconds is None or name == "openrlhf" or seconds >= report["predicted_step_s"] * (1 - 1e-9)
    assert main(["plan", "ppo", "model.path=llama-7b", "critic.path=llama-7b", "world=4", f"device={profile}",
                 "iterations=1500", "train.batch_size=32"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[1] == "allocations:" and "baseline deepspeed_chat" in text


def test_explicit_allocations_win_over_the_planner(capsys):
    assert main(["plan", "grpo", "model.path=llama-7b", "world=4", "gpus_per_node=4", "iterations=500",
                 "allocations.actor_gen.mesh=0-1", "allocations.actor_gen.strategy=d1t2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["allocations"]["actor_gen"] == {"mesh": "0-1", "strategy": "d1t2"}
    assert report["fixed_by_config"] == ["actor_gen"]


def test_openrlhf_splits_whole_nodes_in_thirds():
    gen, actor, critic = openrlhf_meshes(128, 8)
    assert (actor.size, critic.size, gen.size) == (32, 32, 64)  # 16 nodes: 5 each rounded down to 4, the rest
    gen, actor, critic = openrlhf_meshes(8, 8)
    assert (actor.ranks, critic.ranks, gen.ranks) == ((0, 1), (2, 3), (4, 5, 6, 7))
    assert openrlhf_meshes(2, 2) is None


def test_a_cluster_too_small_for_the_models_says_how_many_devices_they_need(capsys):
    assert main(["plan", "ppo", "model.path=llama-70b", "critic.path=llama-70b", "world=2", "gpus_per_node=2",
                 "iterations=200", "--json"]) == 2
    assert re.search(r"no allocation fits in 75 GiB per device \(h100\).* at least \d+ devices of this memory",
                     capsys.readouterr().err)
