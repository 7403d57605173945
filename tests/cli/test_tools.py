"""The tool commands: plan statistics (pure) and the reallocation benchmark (real processes)."""

import json

from tests.cli.helpers import run_cli


def test_plan_stats_json(tmp_path):
    result = run_cli(["plan-stats", "model=llama-7b", "world=8", "src=zero3", "dst=d4t2", "--json"], tmp_path, 120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["recv_equals_lower_bound"] and report["params"] == 6_738_415_616
    # every rank needs a 1/2 tensor shard of the model and holds 1/8 of it, part of which it needs
    shard = report["model_bytes"] / 2
    assert 0.7 * shard < report["recv_bytes_mean"] <= shard
    failed = run_cli(["plan-stats", "model=smollm2-135m-instruct", "world=2", "dst=t2"], tmp_path, 120)
    assert failed.returncode == 2 and "tp=2 does not divide model.layers.0.self_attn.q_proj.weight" in failed.stderr


def test_realloc_benchmark_reports_both_and_checks_itself(tmp_path):
    result = run_cli(["bench", "realloc", "model=tiny-llama", "dst=t2", "repeat=1", "--json"], tmp_path, 300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    for variant in ("ours", "baseline"):
        assert set(report[variant]) == {"time_s", "peak_mem_bytes", "recv_bytes_per_rank"}
        assert report[variant]["time_s"] > 0
    assert report["outputs_equal"] and report["recv_equals_lower_bound"]
    assert report["speedup"] == report["baseline"]["time_s"] / report["ours"]["time_s"]
    assert report["ours"]["recv_bytes_per_rank"] < report["baseline"]["recv_bytes_per_rank"]
