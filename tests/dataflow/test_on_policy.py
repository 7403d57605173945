"""The policy's log-probs are one quantity everywhere: with old_logprobs=recompute the first PPO
update is exactly on-policy (ratio 1 on every token), with old_logprobs=rollout the generation's
log-probs match the training path's, and truncated sampling records the untruncated log-probs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed import run_ranks

BASE = ["model.path=tiny-llama", "train.batch_size=4", "train.micro_batch_size=2", "train.max_steps=1",
        "data.eval=", "rollout.max_new_tokens=8", "output.save_hf=false", "algo.epochs=1", "algo.minibatches=1"]
CASES = {
    "recompute_t06_fp32": ["algo.old_logprobs=recompute", "rollout.temperature=0.6", "engine.dtype=fp32"],
    "recompute_t1_fp32": ["algo.old_logprobs=recompute", "rollout.temperature=1.0", "engine.dtype=fp32"],
    "recompute_t06_bf16": ["algo.old_logprobs=recompute", "rollout.temperature=0.6", "engine.dtype=bf16"],
    "recompute_t1_bf16": ["algo.old_logprobs=recompute", "rollout.temperature=1.0", "engine.dtype=bf16"],
    "rollout_t06_fp32": ["algo.old_logprobs=rollout", "rollout.temperature=0.6", "engine.dtype=fp32"],
    "rollout_truncated_fp32": ["algo.old_logprobs=rollout", "rollout.temperature=0.6", "rollout.top_k=5",
                               "rollout.top_p=0.9", "rollout.min_new_tokens=4", "engine.dtype=fp32"],
    "custom_reward": ["reward.function=tests.dataflow.test_on_policy:half_a_point", "data.eval=builtin:arith",
                      "rollout.eval_prompts=4", "rollout.eval_max_new_tokens=4"],
}


def half_a_point(prompts, completions, **fields):
    """A reward function that is not a 0/1 verifier."""
    return [0.5] * len(completions)


def _first_steps(rank: int, world: int, out: str) -> None:
    from ds_realloc.dataflow.rlhf import PPO, PPOConfig
    from ds_realloc.dataflow.runner import run_experiment
    from ds_realloc.utils.config import load_config

    for name, overrides in CASES.items():
        run_experiment(PPO, load_config(PPOConfig, None, [*BASE, *overrides, f"output.dir={out}/{name}"]))


@pytest.fixture(scope="module")
def first_steps(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("on_policy")
    run_ranks(_first_steps, 2, str(out), timeout=400)
    return {name: json.loads((Path(out) / name / "metrics.jsonl").read_text().splitlines()[-1]) for name in CASES}


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("recompute")])
def test_recompute_makes_the_first_update_exactly_on_policy(first_steps, case):
    step = first_steps[case]
    assert step["actor/approx_kl"] == 0.0 and step["actor/clip_fraction"] == 0.0
    assert step["actor/ratio"] == 1.0
    assert step["time/actor_logp_s"] > 0 and step["time/critic_values_s"] > 0  # their own MFCs, timed
    assert 0 <= step["rollout/logprob_gap_mean"] <= step["rollout/logprob_gap_max"]


@pytest.mark.parametrize("case", ["rollout_t06_fp32", "rollout_truncated_fp32"])
def test_generation_records_the_training_paths_logprobs(first_steps, case):
    """At temperature 0.6, and with top-k / top-p / min_new_tokens truncation: the untruncated
    log-probs at the sampling temperature, the same as the training forward's (fp32)."""
    step = first_steps[case]
    assert step["rollout/logprob_gap_mean"] < 1e-4
    assert step["actor/approx_kl"] < 1e-8 and step["actor/clip_fraction"] == 0.0


@pytest.mark.parametrize("case", [c for c in CASES if c.endswith("fp32")])
def test_the_reference_equals_the_actor_at_step_1(first_steps, case):
    assert abs(first_steps[case]["actor/kl"]) < 1e-6


def test_evaluation_scores_with_the_configured_reward(first_steps, tmp_path_factory):
    summary = json.loads(next(Path(tmp_path_factory.getbasetemp()).glob("on_policy*/custom_reward/summary.json"))
                         .read_text())
    for evaluation in (summary["eval_before"], summary["eval_after"]):
        assert evaluation["eval/reward"] == 0.5
        assert "eval/accuracy" not in evaluation  # not 0/1 rewards: no accuracy claimed
