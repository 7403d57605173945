"""The planner against real runs: predicted and measured step time, per-MFC time and memory.

`ds-realloc bench planner` runs each of a fixed set of allocations of PPO and GRPO (generation on
both ranks or on one, training on both ranks or split between them, ZeRO stages 1-3, several
micro-batch sizes) and the planner's own choice (`allocation=auto`), each in fresh processes for
`steps` steps; the first `warmup` steps are not measured, the rest give medians. The planner
predicts each allocation with this machine's device profile (`ds-realloc profile`, with the
model's calls timed; measured once and cached, never from these runs). Reported:
- `kendall_tau`: how the predicted step times rank the allocations against the measured ones
  (tau-b over all pairs of one command's allocations, pooled over the commands);
- `median_mfc_error`: the median of |predicted - measured| / measured over every call that runs a
  model, in every allocation;
- `memory_error`: the median over ranks and allocations of the same relative error for the peak
  memory above the level right after start-up (`memory_max_error`: the largest), on the ranks that
  run a model (a rank an allocation leaves idle holds a few MiB: its relative error means nothing);
- `chosen_over_best`: per command, the measured step time of the planner's choice over the best
  measured one; `auto_over_default`: samples/s of `allocation=auto` over the default allocation.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ds_realloc.bench import bench_main
from ds_realloc.utils.config import invalid, option

DEFAULT = "default"
AUTO = "auto"
# (command, name, overrides): the measured allocations besides `auto`
ALLOCATIONS = (
    ("ppo", DEFAULT, ()),
    ("ppo", "gen_on_rank0", ("allocations.actor_gen.mesh=0", "allocations.ref_inf.mesh=0",
                             "allocations.critic_inf.mesh=1")),
    ("ppo", "train_both_ranks", ("allocations.actor_train.mesh=0-1", "allocations.critic_train.mesh=0-1")),
    ("ppo", "zero2_split", ("allocations.actor_train.zero_stage=2", "allocations.critic_train.zero_stage=2")),
    ("ppo", "zero1_micro4", ("allocations.actor_train.zero_stage=1", "allocations.actor_train.micro_batch_size=4",
                             "allocations.critic_train.zero_stage=1", "allocations.critic_train.micro_batch_size=2")),
    ("ppo", "both_ranks_zero2_micro4", ("allocations.actor_train.mesh=0-1", "allocations.critic_train.mesh=0-1",
                                        "allocations.actor_train.zero_stage=2",
                                        "allocations.critic_train.zero_stage=2",
                                        "allocations.actor_train.micro_batch_size=4",
                                        "allocations.critic_train.micro_batch_size=4")),
    ("grpo", DEFAULT, ()),
    ("grpo", "train_rank0_zero2", ("allocations.actor_train.mesh=0", "allocations.actor_train.zero_stage=2")),
    ("grpo", "gen_rank1_micro2", ("allocations.actor_gen.mesh=1", "allocations.ref_inf.mesh=1",
                                  "allocations.actor_train.micro_batch_size=2")),
    ("grpo", "rank1_alone_micro1", ("allocations.actor_gen.mesh=1", "allocations.ref_inf.mesh=1",
                                    "allocations.actor_train.mesh=1", "allocations.actor_train.micro_batch_size=1")),
)


@dataclass
class PlannerBenchConfig:
    commands: list[str] = option(["ppo", "grpo"], "the RL commands measured")
    model: str = option("smollm2-135m-instruct", "a preset or HF folder (actor, reference and critic)")
    nprocs: int = option(2, "processes")
    steps: int = option(4, "steps per allocation, warm-up included")
    warmup: int = option(1, "first steps left out of the medians")
    only: list[str] = option([], "measure only these allocations (names of the table; [] = all)")
    timeout_s: float = option(1200.0, "give up after this many seconds per allocation")

    def validate(self) -> None:
        if not 0 <= self.warmup < self.steps - 1:
            raise invalid("warmup", f"must leave at least 2 measured steps of steps={self.steps}")
        unknown = [c for c in self.commands if c not in {c for c, _, _ in ALLOCATIONS}]
        if unknown:
            raise invalid("commands", f"'{unknown[0]}' has no allocations in this benchmark (ppo, grpo)")


def _base_overrides(cfg: PlannerBenchConfig, out: Path) -> list[str]:
    return [f"model.path={cfg.model}", f"train.max_steps={cfg.steps}", "data.eval=", "output.save_hf=false",
            f"output.dir={out}"]


def _run_rank(rank: int, world: int, command: str, overrides: list[str]) -> None:
    from ds_realloc.dataflow.catalog import find_experiment
    from ds_realloc.dataflow.runner import run_experiment
    from ds_realloc.planner.auto import resolve_auto
    from ds_realloc.utils.config import load_config

    experiment = find_experiment(command)
    cfg = load_config(experiment.config_cls, None, overrides)
    predicted = {}
    if cfg.allocation == AUTO:
        cfg, predicted = resolve_auto(experiment, cfg)
    run_experiment(experiment, cfg, predicted)


def measured(run_dir: Path, warmup: int) -> dict:
    """Medians over the measured steps of a run: step and per-MFC seconds; peak memory above start-up per rank."""
    from ds_realloc.dataflow.spans import read_timeline

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > warmup]
    names = sorted({k for r in timed for k in r if k.startswith("time/") and k != "time/step_s"})
    timeline = read_timeline(run_dir)
    ranks = max(len(records) for records in timeline.values())
    memory = [max(rec[rank]["memory_peak_bytes"] - rec[rank]["memory_start_bytes"] for rec in timeline.values())
              for rank in range(ranks)]
    config = json.loads((run_dir / "config.json").read_text())
    sequences = config["train"]["batch_size"] * config["rollout"]["samples_per_prompt"]
    step_s = statistics.median(r["time/step_s"] for r in timed)
    return {"step_s": step_s, "samples_per_s": sequences / step_s,
            "mfc_s": {n[5:-2]: statistics.median(r[n] for r in timed if n in r) for n in names},
            "memory_above_start_bytes": memory,
            "allocations": json.loads((run_dir / "summary.json").read_text())["allocations"]}


def predicted(command: str, overrides: list[str], world: int) -> dict:
    """The planner's estimate of a run's own allocation (the plan's for `allocation=auto`)."""
    from ds_realloc.dataflow.catalog import find_experiment
    from ds_realloc.planner.auto import apply_plan, machine_profile, plan_for, typical_prompt_len
    from ds_realloc.planner.report import PlanConfig, estimate_config
    from ds_realloc.utils.config import load_config

    experiment = find_experiment(command)
    cfg = load_config(experiment.config_cls, None, overrides)
    if cfg.allocation == AUTO:
        cfg, _ = apply_plan(cfg, plan_for(experiment, cfg, world))
    profile = machine_profile(experiment, cfg, world)
    pcfg = PlanConfig(world=world, device=profile.name, prompt_len=typical_prompt_len(experiment, cfg, world))
    estimate, startup = estimate_config(experiment, cfg, pcfg, profile)
    return {"step_s": estimate.step_s, "mfc_s": dict(estimate.call_s),
            "memory_above_start_bytes": [p - s for p, s in zip(estimate.peak_bytes, startup)]}


def kendall_tau(xs: list[float], ys: list[float]) -> float:
    """Kendall's tau-b of two equally long sequences."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            dx, dy = xs[i] - xs[j], ys[i] - ys[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator else 0.0


def pooled_tau(rows: list[dict]) -> float:
    """tau-b over the pairs of allocations of the same command (pairs across commands are not comparable)."""
    concordant = total = 0.0
    for command in sorted({r["command"] for r in rows}):
        mine = [r for r in rows if r["command"] == command]
        pairs = len(mine) * (len(mine) - 1) / 2
        if pairs:
            concordant += kendall_tau([r["predicted"]["step_s"] for r in mine],
                                      [r["measured"]["step_s"] for r in mine]) * pairs
            total += pairs
    return concordant / total if total else 0.0


def _relative(predicted_value: float, measured_value: float) -> float:
    return abs(predicted_value - measured_value) / max(measured_value, 1e-9)


def model_ranks(allocations: dict[str, str], model_mfcs: set[str]) -> set[int]:
    """The ranks some call that runs a model is placed on, from a run's summary (`zero3:d1@[1]`)."""
    from ds_realloc.layout.mesh import parse_mesh

    return {rank for name, text in allocations.items() if name in model_mfcs
            for rank in parse_mesh(text.rsplit("@", 1)[1].strip("[]")).ranks}


def summarise(rows: list[dict], model_mfcs: dict[str, set[str]]) -> dict:
    mfc_errors, memory_errors = [], []
    for r in rows:
        for name, seconds in r["measured"]["mfc_s"].items():
            if name in model_mfcs[r["command"]] and name in r["predicted"]["mfc_s"]:
                mfc_errors.append(_relative(r["predicted"]["mfc_s"][name], seconds))
        busy = model_ranks(r["measured"]["allocations"], model_mfcs[r["command"]])
        for rank, (p, m) in enumerate(zip(r["predicted"]["memory_above_start_bytes"],
                                          r["measured"]["memory_above_start_bytes"])):
            if rank in busy:  # an idle rank holds next to nothing: its relative error would be noise over zero
                memory_errors.append(_relative(p, m))
    chosen = {}
    for command in sorted({r["command"] for r in rows}):
        mine = [r for r in rows if r["command"] == command]
        best = min(r["measured"]["step_s"] for r in mine)
        auto = [r for r in mine if r["name"] == AUTO]
        default = [r for r in mine if r["name"] == DEFAULT]
        chosen[command] = {
            "chosen_over_best": auto[0]["measured"]["step_s"] / best if auto else None,
            "auto_over_default": (auto[0]["measured"]["samples_per_s"] / default[0]["measured"]["samples_per_s"]
                                  if auto and default else None),
            "step_s_range": max(r["measured"]["step_s"] for r in mine) / best}
    ratios = [c["chosen_over_best"] for c in chosen.values() if c["chosen_over_best"] is not None]
    return {"kendall_tau": pooled_tau(rows),
            "median_mfc_error": statistics.median(mfc_errors) if mfc_errors else None,
            "memory_error": statistics.median(memory_errors) if memory_errors else None,
            "memory_max_error": max(memory_errors) if memory_errors else None,
            "chosen_over_best": max(ratios) if ratios else None, "per_command": chosen}


def _model_mfcs(command: str) -> set[str]:
    from ds_realloc.dataflow.catalog import find_experiment
    from ds_realloc.utils.config import load_config

    experiment = find_experiment(command)
    cfg = load_config(experiment.config_cls, None, [])
    roles = {s.role for s in experiment.roles(cfg)}
    return {m.name for m in experiment.mfcs(cfg) if m.role in roles}


def run_planner_bench(cfg: PlannerBenchConfig) -> dict:
    from ds_realloc.models.presets import resolve_model_path
    from ds_realloc.utils.spawn import run_ranks

    resolve_model_path(cfg.model, field="model")
    table = [(c, n, list(o)) for c, n, o in ALLOCATIONS if c in cfg.commands]
    table += [(c, AUTO, ["allocation=auto"]) for c in cfg.commands]
    if cfg.only:
        table = [row for row in table if row[1] in cfg.only]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ds_realloc_bench_planner_") as tmp:
        for command, name, overrides in table:
            out = Path(tmp) / f"{command}-{name}"
            settings = [*_base_overrides(cfg, out), *overrides]
            run_ranks(_run_rank, cfg.nprocs, command, settings, timeout=cfg.timeout_s)
            rows.append({"command": command, "name": name, "overrides": overrides,
                         "measured": measured(out, cfg.warmup), "predicted": predicted(command, settings, cfg.nprocs)})
    report = {"model": cfg.model, "nprocs": cfg.nprocs, "steps": cfg.steps, "warmup": cfg.warmup, "table": rows}
    return {**report, **summarise(rows, {c: _model_mfcs(c) for c in cfg.commands})}


def format_report(report: dict) -> str:
    mib = 2 ** 20
    lines = [f"planner vs {len(report['table'])} measured allocations ({report['model']}, {report['nprocs']} "
             f"processes, median of {report['steps'] - report['warmup']} steps)",
             f"{'command':<6}{'allocation':<26}{'measured s':>11}{'predicted s':>12}  memory above start-up MiB "
             f"(measured / predicted per rank)"]
    for r in report["table"]:
        memory = ", ".join(f"{m / mib:.0f}/{p / mib:.0f}" for m, p in zip(r["measured"]["memory_above_start_bytes"],
                                                                          r["predicted"]["memory_above_start_bytes"]))
        lines.append(f"{r['command']:<6}{r['name']:<26}{r['measured']['step_s']:>11.2f}"
                     f"{r['predicted']['step_s']:>12.2f}  {memory}")
    for key in ("kendall_tau", "median_mfc_error", "memory_error", "memory_max_error", "chosen_over_best"):
        value = report[key]
        lines.append(f"{key}: {'-' if value is None else f'{value:.3f}'}")
    for command, c in report["per_command"].items():
        lines.append(f"{command}: chosen/best {c['chosen_over_best']}, auto/default samples/s {c['auto_over_default']}, "
                     f"measured step range {c['step_s_range']:.2f}x")
    return "\n".join(lines)


CONFIG = PlannerBenchConfig


def main(args: list[str]) -> int:
    return bench_main(args, PlannerBenchConfig, run_planner_bench, format_report)
