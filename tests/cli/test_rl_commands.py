"""The RL commands end to end on a tiny model: they learn, survive a dead rank, and resume exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.cli.helpers import GOLDEN_ENV, UNTIMED, check_golden, metrics, run_cli, summary
from tests.distributed import free_port, run_ranks

TINY_RL = ["model.path=tiny-llama", "rollout.max_new_tokens=8", "rollout.eval_max_new_tokens=8",
           "rollout.eval_prompts=8", "output.save_hf=false"]
# A toy reward a random tiny model can learn: the share of lowercase letters in the completion.
TOY_REWARD = """
def lowercase_share(prompts, completions, **fields):
    return [sum(c.islower() for c in text) / max(len(text), 1) for text in completions]
"""


def _assert_ok(result):
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_grpo_raises_a_toy_reward(tmp_path):
    (tmp_path / "toy_reward.py").write_text(TOY_REWARD)
    run = tmp_path / "run"
    _assert_ok(run_cli(["grpo", *TINY_RL, "reward.function=toy_reward:lowercase_share", "train.max_steps=20",
                        "train.batch_size=8", "train.micro_batch_size=8", "optim.lr=1e-2", "algo.kl_coef=0",
                        "data.eval=", f"output.dir={run}"], tmp_path, timeout=600, env=GOLDEN_ENV))
    rewards = [row["actor/reward"] for row in metrics(run) if row["step"] >= 1]
    assert len(rewards) == 20
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.3 and last > first + 0.5, rewards  # measured: 0.16 -> 0.97
    check_golden("grpo", run)


def lowercase_share(prompts, completions, **fields):
    """TOY_REWARD, importable by the in-process runs below."""
    return [sum(c.islower() for c in text) / max(len(text), 1) for text in completions]


OTHERS = ("rloo", "remax", "raft")


def _other_algorithms(rank: int, world: int, out: str) -> None:
    from ds_realloc.cli import distributed_commands, parse_run_args

    commands = distributed_commands()
    for command in OTHERS:  # what `ds-realloc <command>` runs on each rank, both ranks in these two processes
        args = [*TINY_RL, "train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=2",
                "reward.function=tests.cli.test_rl_commands:lowercase_share", f"output.dir={out}/{command}"]
        commands[command].run(parse_run_args(commands[command].config_cls, args))


@pytest.fixture(scope="module")
def other_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("others")
    run_ranks(_other_algorithms, 2, str(out), timeout=400)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("command", OTHERS)
def test_other_algorithms_train_and_report(other_runs, command):
    run = other_runs / command
    rows = {row["step"]: row for row in metrics(run)}
    assert sorted(rows) == [0, 1, 2]
    for step in (1, 2):
        assert 0.0 <= rows[step]["actor/reward"] <= 1.0
        assert rows[step]["actor/grad_norm"] > 0  # the actor took an optimizer step on a real loss
        assert rows[step]["time/actor_gen_s"] > 0 and rows[step]["time/actor_train_s"] > 0
    if command == "remax":
        assert rows[1]["time/actor_greedy_gen_s"] > 0
    result = summary(run)
    assert result["steps"] == 2 and "eval/accuracy" in result["eval_before"] and "eval/accuracy" in result["eval_after"]
    assert set(result["mean_time_per_mfc_s"]) >= {"actor_gen", "actor_train", "rew_inf"}


def _rank_processes(args, run, world):
    """`world` ranks started as a bare launcher would (mpirun-style: no supervisor that stops the others)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONWARNINGS": "ignore"}
        procs.append(subprocess.Popen([sys.executable, "-m", "ds_realloc", *args], cwd=run.parent, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def _wait_for_step(run, step, procs, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and any(r["step"] >= step for r in metrics(run)):
            return
        assert all(p.poll() is None for p in procs), [p.stderr.read()[-3000:] for p in procs]
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


STEPS = 30  # tiny steps take ~0.2 s: long enough to be killed mid-run


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_and_resume_matches_an_uninterrupted_run(tmp_path):
    args = ["ppo", *TINY_RL, "train.batch_size=4", "train.micro_batch_size=2", f"train.max_steps={STEPS}",
            "train.save_every=1", "data.eval=", "launch.dist_timeout_s=300", "ref.ema=0.25"]
    full = tmp_path / "full"
    _assert_ok(run_cli([*args, f"output.dir={full}"], tmp_path, env=GOLDEN_ENV))
    check_golden("ppo", full)

    broken = tmp_path / "broken"
    procs = _rank_processes([*args, f"output.dir={broken}"], broken, 2)
    try:
        _wait_for_step(broken, 3, procs)  # step 2 is saved (before step 3 ran): the ranks are in step 4 or saving 3
        os.kill(procs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        procs[0].wait(timeout=60)  # the survivor notices on its own: no launcher stops it
        assert time.monotonic() - killed < 60
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    message = procs[0].stderr.read()
    assert procs[0].returncode != 0
    assert "ds-realloc ppo: error: rank 0 lost contact with another rank during " in message, message[-3000:]
    assert "Traceback" not in message, message[-3000:]
    for child in psutil.Process().children(recursive=True):  # no orphaned worker of the run is left
        assert "ds_realloc" not in " ".join(child.cmdline())

    saved = int((broken / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert 2 <= saved < STEPS
    _assert_ok(run_cli([*args, f"output.dir={broken}", "--resume"], tmp_path))
    expected = {row["step"]: row for row in metrics(full)}
    got = {row["step"]: row for row in metrics(broken)}
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(saved + 1, STEPS + 1):
        keys = [k for k in expected[step] if not k.startswith(UNTIMED) and not k.endswith(UNTIMED)]
        assert keys and {k: got[step][k] for k in keys} == pytest.approx({k: expected[step][k] for k in keys},
                                                                            rel=1e-6, abs=1e-6), step
    assert json.loads((broken / "summary.json").read_text())["steps"] == STEPS


@pytest.mark.slow
def test_grpo_on_a_mixture_of_experts_with_expert_parallel_generation(tmp_path):
    """ZeRO-3 training of tiny-qwen3-moe on 2 ranks while every rollout is generated on an expert-parallel
    layout (d2e2: each rank holds half of every sparse layer's experts, reallocated from the live
    partitions each step); the toy reward rises and the saved HF checkpoint holds the published
    per-expert tensors and loads in transformers, every weight present, with the logits of our own
    inference on it."""
    import torch
    from transformers import AutoModelForCausalLM

    (tmp_path / "toy_reward.py").write_text(TOY_REWARD)
    run = tmp_path / "run"
    result = run_cli(["grpo", *TINY_RL[1:], "model.path=tiny-qwen3-moe", "output.save_hf=true",
                      "allocations.actor_gen.strategy=d2e2", "reward.function=toy_reward:lowercase_share",
                      "train.max_steps=20", "train.batch_size=8", "train.micro_batch_size=8", "optim.lr=1e-2",
                      "algo.kl_coef=0", "data.eval=", f"output.dir={run}"], tmp_path, timeout=600, env=GOLDEN_ENV)
    _assert_ok(result)
    assert "actor_gen d2t1e2@[0-1]" in result.stderr and "actor_train zero3:d2@[0-1]" in result.stderr
    rewards = [row["actor/reward"] for row in metrics(run) if row["step"] >= 1]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert len(rewards) == 20 and first < 0.3 and last > first + 0.5, rewards  # measured: 0.13 -> 0.95
    from ds_realloc.models.hf_io import CheckpointReader

    stored = CheckpointReader(run / "hf" / "actor").names()
    assert "model.layers.2.mlp.experts.3.up_proj.weight" in stored and "model.layers.1.mlp.up_proj.weight" in stored
    assert not any(name.endswith(("gate_up_proj", "experts.down_proj")) for name in stored)
    model, info = AutoModelForCausalLM.from_pretrained(run / "hf" / "actor", dtype=torch.float32,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    from tests.models.test_experts import _local_logits

    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    with torch.no_grad():
        assert (model(input_ids=ids).logits - _local_logits(run / "hf" / "actor", ids)).abs().max() <= 1e-4
