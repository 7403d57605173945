"""RLHF steps: per-call allocations with reallocation against DeepSpeed-Chat.

`ds-realloc bench rlhf`: the same command (`ppo` by default), model, data and number of steps, each
row in fresh processes of one run: `ours`, the command's allocations (by default PPO's actor and
critic train side by side on halves of the world, generation and inference on every rank, the
weights reallocated between the layouts; `allocation(s).*` overrides change them); and the
baseline `colocated`, DeepSpeed-Chat's placement *and* mechanism: every call on all ranks one after
the other, trainings included, generation by gathering the ZeRO-3 actor once and HF `generate`,
reference / reward / critic scoring as ZeRO-3 forwards of their engines, nothing reallocated
(`engine.inference=zero3`, `engine.zero_inference`). Other `overrides` apply to both rows.
Reported per row: samples (sequences) per second over the timed steps (the first `warmup` steps
are not timed), the mean time of every MFC and of every reallocation, and the bytes each
reallocation received.
"""

from __future__ import annotations

import json
import shlex
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ds_realloc.bench import bench_main, headline
from ds_realloc.utils.config import invalid, option

ROWS = ("ours", "colocated")
BASELINES = {"colocated": "DeepSpeed-Chat: every call on all ranks, ZeRO-3 training, gather-once + HF generate, "
                          "ZeRO-3 forwards for inference (no reallocation)"}


@dataclass
class RLHFBenchConfig:
    command: str = option("ppo", "the RL command: ppo, grpo, rloo, remax or raft")
    model: str = option("smollm2-135m-instruct", "a preset or HF folder (actor, reference and critic)")
    nprocs: int = option(2, "processes")
    steps: int = option(4, "steps per row, warm-up included")
    warmup: int = option(1, "first steps left out of the timing")
    overrides: str = option("", "key=value settings of the command, space-separated, for both rows except "
                                "allocation(s).*, which place `ours` only; e.g. 'allocations.actor_gen.strategy=t2 "
                                "train.batch_size=8'")
    timeout_s: float = option(1800.0, "give up after this many seconds per row")

    def validate(self) -> None:
        from ds_realloc.dataflow.rlhf import RL_EXPERIMENTS

        commands = [e.command for e in RL_EXPERIMENTS]
        if self.command not in commands:
            raise invalid("command", f"must be an RL command ({', '.join(commands)}), got '{self.command}'")
        if not 0 <= self.warmup < self.steps:
            raise invalid("warmup", f"must be in [0, steps={self.steps})")


def _command_overrides(cfg: RLHFBenchConfig, out: Path, row: str) -> list[str]:
    base = [f"model.path={cfg.model}", f"train.max_steps={cfg.steps}", "data.eval=", "output.save_hf=false",
            f"output.dir={out}"]
    overrides = shlex.split(cfg.overrides)
    if row == "ours":
        return [*base, *overrides]
    shared = [o for o in overrides if not o.startswith(("allocation", "engine.inference"))]  # not the placement
    return [*base, *shared, "engine.inference=zero3",
            *(f"allocations.{mfc}.mesh=0-{cfg.nprocs - 1}" for mfc in _train_mfcs(cfg))]


def _train_mfcs(cfg: RLHFBenchConfig) -> list[str]:
    from ds_realloc.dataflow.catalog import find_experiment
    from ds_realloc.dataflow.mfc import MFCKind

    experiment = find_experiment(cfg.command)
    return [m.name for m in experiment.mfcs(experiment.config_cls()) if m.kind is MFCKind.TRAIN]


def _bench_rank(rank: int, world: int, command: str, overrides: list[str]) -> dict | None:
    from ds_realloc.dataflow.catalog import find_experiment
    from ds_realloc.dataflow.runner import run_experiment
    from ds_realloc.utils.config import load_config

    experiment = find_experiment(command)
    run_experiment(experiment, load_config(experiment.config_cls, None, overrides))
    return None


def _row_report(run_dir: Path, warmup: int) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > warmup]
    config = json.loads((run_dir / "config.json").read_text())
    sequences = config["train"]["batch_size"] * config["rollout"]["samples_per_prompt"]
    step_s = statistics.mean(r["time/step_s"] for r in timed)

    def means(prefix: str, suffix: str) -> dict[str, float]:
        names = sorted({k for r in timed for k in r if k.startswith(prefix) and k.endswith(suffix)})
        return {n.removeprefix(prefix).removesuffix(suffix): statistics.mean(r.get(n, 0.0) for r in timed)
                for n in names}

    calls = {name: seconds for name, seconds in means("time/", "_s").items() if name != "step"}
    return {"samples_per_s": sequences / step_s, "step_s": step_s, "sequences_per_step": sequences,
            "time_per_mfc_s": calls, "realloc_s": means("realloc/", "_s"),
            "realloc_recv_bytes": means("realloc/", "_recv_bytes"),
            "allocations": json.loads((run_dir / "summary.json").read_text())["allocations"]}


def run_rlhf_bench(cfg: RLHFBenchConfig) -> dict:
    from ds_realloc.models.presets import resolve_model_path
    from ds_realloc.utils.spawn import run_ranks

    resolve_model_path(cfg.model, field="model")
    report: dict = {"command": cfg.command, "model": cfg.model, "nprocs": cfg.nprocs, "steps": cfg.steps,
                    "warmup": cfg.warmup, "overrides": cfg.overrides}
    with tempfile.TemporaryDirectory(prefix="ds_realloc_bench_rlhf_") as tmp:
        for row in ROWS:
            out = Path(tmp) / row
            run_ranks(_bench_rank, cfg.nprocs, cfg.command, _command_overrides(cfg, out, row), timeout=cfg.timeout_s)
            report[row] = _row_report(out, cfg.warmup)
    report["speedup"] = report["ours"]["samples_per_s"] / report["colocated"]["samples_per_s"]
    report["baselines"] = BASELINES
    return {**report, **headline(report, ("ours",), tuple(BASELINES), "samples_per_s", memory=None)}


def format_report(report: dict) -> str:
    lines = [f"{report['command']} steps, {report['model']}, {report['nprocs']} processes, "
             f"{report['steps'] - report['warmup']} timed steps"]
    for row in ROWS:
        r = report[row]
        calls = "  ".join(f"{name} {seconds:.2f}s" for name, seconds in r["time_per_mfc_s"].items())
        moves = "  ".join(f"{name} {seconds:.2f}s" for name, seconds in r["realloc_s"].items())
        lines += [f"  {row:<10} {r['samples_per_s']:7.2f} samples/s  {r['step_s']:6.2f} s/step",
                  "    placement: " + "; ".join(f"{name} {where}" for name, where in r["allocations"].items()),
                  f"    calls:   {calls}", f"    realloc: {moves}"]
    lines.append(f"  speedup vs {report['best_baseline']} ({BASELINES[report['best_baseline']]}): "
                 f"{report['speedup_vs_best']:.2f}x")
    return "\n".join(lines)


def main(args: list[str]) -> int:
    return bench_main(args, RLHFBenchConfig, run_rlhf_bench, format_report)


CONFIG = RLHFBenchConfig
