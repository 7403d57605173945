"""The tool commands: plan statistics (pure) and the reallocation benchmark (real processes)."""

import json

from tests.cli.helpers import run_cli, run_main


def test_plan_stats_json(tmp_path):
    result = run_main(["plan-stats", "model=llama-7b", "world=8", "src=zero3", "dst=d4t2", "--json"])
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["recv_equals_lower_bound"] and report["params"] == 6_738_415_616
    # every rank needs a 1/2 tensor shard of the model and holds 1/8 of it, part of which it needs
    shard = report["model_bytes"] / 2
    assert 0.7 * shard < report["recv_bytes_mean"] <= shard
    failed = run_main(["plan-stats", "model=smollm2-135m-instruct", "world=2", "dst=t2"])
    assert failed.returncode == 2 and "tp=2 does not divide model.layers.0.self_attn.q_proj.weight" in failed.stderr


def test_realloc_benchmark_reports_both_and_checks_itself(tmp_path):
    result = run_cli(["bench", "realloc", "model=tiny-llama", "dst=t2", "repeat=1", "--json"], tmp_path, 300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    for variant in ("ours", "baseline", "deepspeed_tp_gather"):  # DeepSpeed's gather-all and its TP path
        assert set(report[variant]) == {"time_s", "peak_mem_bytes", "recv_bytes_per_rank"}
        assert report[variant]["time_s"] > 0
    assert report["outputs_equal"] and report["recv_equals_lower_bound"]  # both baselines' shards checked too
    assert report["speedup"] == report["baseline"]["time_s"] / report["ours"]["time_s"]
    assert report["ours"]["recv_bytes_per_rank"] < report["baseline"]["recv_bytes_per_rank"]
    best = min(("baseline", "deepspeed_tp_gather"), key=lambda v: report[v]["time_s"])
    assert report["best_baseline"] == best
    assert report["speedup_vs_best"] == report[best]["time_s"] / report["ours"]["time_s"]
    assert report["mem_ratio_vs_best"] == report["ours"]["peak_mem_bytes"] / report[best]["peak_mem_bytes"]


def test_generate_is_the_same_greedy_text_at_tp2_and_d2(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {n}", "answer": str(n)}) + "\n" for n in range(5)))
    outputs = {}
    for name, layout in [("t2", ["--tp", "2"]), ("d2", ["--tp", "1"])]:
        out = tmp_path / f"{name}.jsonl"
        result = run_cli(["generate", "--model", "tiny-llama", "--prompts", str(prompts), *layout, "--greedy",
                          "--max_new_tokens", "12", "--out", str(out)], tmp_path, 300)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert outputs["t2"] == outputs["d2"]
    assert [row["prompt"] for row in outputs["t2"]] == [f"Count to {n}" for n in range(5)]
    assert all(set(row) == {"prompt", "completion", "token_ids", "answer"} and row["token_ids"] for row in outputs["t2"])


def test_generate_reports_layouts_the_model_cannot_take(tmp_path):
    result = run_main(["generate", "--tp", "2", "--max_new_tokens", "4"])  # SmolLM2 has 9 heads
    assert result.returncode != 0 and "tp=2 does not divide" in result.stderr and "9 heads" in result.stderr


def test_generation_benchmark_reports_every_row(tmp_path):
    """On a mixture of experts, so that the expert-parallel row runs too."""
    result = run_cli(["bench", "generate", "model=tiny-mixtral", "batch_size=4", "new_tokens=8", "--json"], tmp_path,
                     300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    rows = ("zero3_hf_generate", "zero3_gather_once_hf_generate", "ours_d2", "ours_t2", "ours_e2",
            "replicated_hf_generate", "initialize_t2")
    for row in rows:
        assert report[row]["generated_tokens"] == 4 * 8 and report[row]["tokens_per_s"] > 0
        assert {"tokens_per_s", "peak_mem_bytes", "realloc_s"} <= set(report[row])
    assert report["speedup_t2"] == report["ours_t2"]["tokens_per_s"] / report["zero3_hf_generate"]["tokens_per_s"]
    best = max(("zero3_hf_generate", "zero3_gather_once_hf_generate"), key=lambda r: report[r]["tokens_per_s"])
    ours = max(("ours_d2", "ours_t2", "ours_e2"), key=lambda r: report[r]["tokens_per_s"])
    assert report["best_baseline"] == best and report["best"] == ours  # the replica is a reference, not a baseline
    assert report["speedup_vs_best"] == report[ours]["tokens_per_s"] / report[best]["tokens_per_s"]
    assert report["initialize_vs_ours_t2"] == report["initialize_t2"]["tokens_per_s"] / report["ours_t2"]["tokens_per_s"]


def test_rlhf_benchmark_reports_both_placements(tmp_path):
    overrides = "train.batch_size=4 train.micro_batch_size=2 rollout.max_new_tokens=4"
    result = run_cli(["bench", "rlhf", "model=tiny-llama", "steps=2", f"overrides={overrides}", "--json"], tmp_path,
                     300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["ours"]["allocations"]["actor_train"] == "zero3:d1@[0]"
    assert report["ours"]["allocations"]["critic_train"] == "zero3:d1@[1]"
    assert report["colocated"]["allocations"]["critic_train"] == "zero3:d2@[0-1]"
    calls = {"actor_gen", "rew_inf", "ref_inf", "critic_inf", "rl_targets", "actor_train", "critic_train"}
    for row in ("ours", "colocated"):
        assert report[row]["samples_per_s"] > 0 and report[row]["sequences_per_step"] == 4
        assert set(report[row]["time_per_mfc_s"]) == calls
    assert report["ours"]["realloc_recv_bytes"]["actor_gen"] > 0  # the actor moved out of its training layout
    assert "actor_gen" not in report["colocated"]["realloc_recv_bytes"]  # DeepSpeed-Chat's mechanism moves nothing
    assert report["best_baseline"] == "colocated" and report["speedup_vs_best"] == report["speedup"]
    assert report["speedup"] == report["ours"]["samples_per_s"] / report["colocated"]["samples_per_s"]


def test_json_output_is_json_alone_in_a_fresh_process(tmp_path):
    """DeepSpeed logs 'Setting accelerator to CPU' to the stdout of its import; a --json command's stdout
    must still parse (piped to jq, read by a script)."""
    for args in (["ops", "--json"], ["plan", "grpo", "model.path=llama-7b", "world=4", "gpus_per_node=4",
                                     "iterations=300", "--json"]):
        result = run_cli(args, tmp_path, 300)
        assert result.returncode == 0, result.stderr[-2000:]
        json.loads(result.stdout)
