"""Bad inputs fail fast with a message that names the problem, and no process hangs (timeouts). The
checks that run before any rank starts are called in-process (`run_main`); the ones inside the ranks
go through a launcher."""

import re
import sys

import pytest

from tests.cli.helpers import TINY_RUN, run_cli, run_main, write_jsonl

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ds_realloc"]


def _failed(result, *needles):
    assert result.returncode != 0, result.stdout[-2000:]
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr[-3000:])
    assert "Traceback" not in result.stderr  # a message, not a stack trace


def _failed_under_launcher(result, needle):
    assert result.returncode != 0 and needle in result.stderr, result.stderr[-3000:]


def test_malformed_jsonl_line(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "answer": "b"}, '{"prompt": "a", "answer": }'])
    result = run_cli(["sft", *TINY_RUN, f"data.train={data}"], tmp_path, timeout=120)  # read inside the ranks
    _failed(result, f"{data}:2: invalid JSON")


def test_missing_field(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                                  {"prompt": "a", "chosen": "b"}])
    result = run_cli(["dpo", *TINY_RUN, f"data.train={data}"], tmp_path, timeout=120)
    _failed(result, f"{data}:2: field 'rejected' is missing")


def test_bad_config_key_in_yaml_and_on_the_command_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  path: tiny-llama\noptim:\n  learning_rate: 0.1\n")
    _failed(run_main(["sft", str(config)]), f"{config}:4: unknown field 'optim.learning_rate'")
    _failed(run_main(["rm", "train.batchsize=4"]),
            "unknown field 'train.batchsize' (did you mean 'train.batch_size'?)")


def test_model_path_that_does_not_exist(tmp_path):
    _failed(run_main(["sft", f"model.path={tmp_path}/missing"]),
            f"model.path: '{tmp_path}/missing' does not exist")
    _failed(run_main(["dpo", *TINY_RUN, f"ref.path={tmp_path}"]),
            f"ref.path: '{tmp_path}' is not an HF model folder")


def test_world_size_that_does_not_fit(tmp_path):
    message = "allocations.actor_train: 3 data-parallel groups do not divide the 8 samples of a step"
    _failed(run_main(["sft", *TINY_RUN, "launch.nprocs=3"]), message)
    # the same check inside the ranks when a launcher started them (torchrun prints its own report)
    _failed_under_launcher(run_cli(["sft", *TINY_RUN, "train.batch_size=6"], tmp_path, timeout=120, launcher=TORCHRUN),
            "train.batch_size=6 is not divisible by train.micro_batch_size=2 x 2 data-parallel ranks")


def test_bad_rl_settings_fail_before_any_process_starts(tmp_path):
    _failed(run_main(["ppo", "model.path=tiny-llama", "allocations.actor_gen.strategy=t3"]),
            "allocations.actor_gen.strategy: t3 needs 3 ranks, the mesh has 2")
    _failed(run_main(["grpo", "model.path=tiny-llama", "reward.function=no_such_module:score"]),
            "reward.function: cannot import module 'no_such_module'")
    _failed(run_main(["ppo", "model.path=tiny-llama", "rollout.offload_train_states=true"]),
            "rollout.offload_train_states: moves GPU states to CPU; this machine has no GPU")


@pytest.mark.parametrize("overrides,message", [
    (["algo.tis_cap=2", "algo.old_logprobs=rollout"], "algo.tis_cap: weights by exp(old - rollout log-prob), which "
                                                      "needs old_logprobs=recompute"),
    (["algo.loss_agg=token-sum"], "algo.loss_agg: 'token-sum' was replaced by 'seq-mean-token-sum-norm'"),
    (["algo.loss_agg=seq-mean"], "algo.loss_agg: 'seq-mean' was replaced by 'seq-mean-token-mean'"),
    (["engine.inference=zero3"],  # PPO trains the actor on rank 0 only: generation cannot use its engine on 0-1
     "allocations.actor_gen: engine.inference=zero3 runs actor_gen on the actor engine itself, so it needs that "
     "engine's mesh [0] with d1; got d2t1@[0-1]"),
])
def test_bad_policy_settings_name_the_field(overrides, message):
    from ds_realloc.dataflow.rlhf import PPO, PPOConfig
    from ds_realloc.dataflow.setup import plan_run
    from ds_realloc.utils.config import load_config
    from ds_realloc.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_run(PPO, load_config(PPOConfig, None, ["model.path=tiny-llama", *overrides]), 2)
