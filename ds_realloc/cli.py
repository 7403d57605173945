"""`ds-realloc <command>`: training commands and tools, one table (`commands()`).

    ds-realloc sft [CONFIG.yaml] [key=value ...] [--resume] [--deepspeed_config FILE] [--help]
    ds-realloc my_algos:TOY [...]   an experiment defined outside the package (module:NAME)

A training command run directly (not under deepspeed / torchrun / accelerate / mpirun / srun)
checks its config, prepares the models, then starts `launch.nprocs` processes itself; each rank
runs the same command line, so a `module:NAME` experiment is imported on every rank.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

from ds_realloc.utils.errors import UserError

USAGE = """usage: ds-realloc <command> [CONFIG.yaml] [key=value | --key value ...] [--resume] [--deepspeed_config FILE]
                  [--dry-run]   (check the command line for launch.nprocs ranks, model.path=llama-7b etc. allowed)

commands (each runs with no arguments on the embedded default model and task):
{commands}
  <module>:<NAME>             the Experiment NAME of an importable module (an algorithm of your own)
tools:
  prepare-model [NAME|PATH]   convert / build a model preset once and print its HF folder
  plan-stats [key=value ...]  traffic of a reallocation plan for any model size and layouts (no processes)
  profile [ranks=N] [model=PATH] [out=FILE.json]
                              measure this machine (and a model's calls) into a device profile for the planner
  timeline RUN_DIR [--plan] [step=N] [out=FILE.svg]
                              a run's measured per-rank timeline, beside the planner's prediction with --plan
  plan <command> [key=value ...] [world=N gpus_per_node=G device=h100|h200|a100|PROFILE.json] [--json]
                              the planner's allocations for a command on a cluster, with predicted times and
                              memory, against DeepSpeed-Chat's and OpenRLHF's placements (no processes)
  bench <name> [key=value ...] [--json]   benchmarks against a named baseline: {benchmarks}
  ops [--json]                the op_builder kernels: compatible here, built, loaded, from where

`ds-realloc <command> --help` lists every config field with its type, default and meaning."""


@dataclass(frozen=True)
class DistributedCommand:
    """A command that runs on every rank: its config, what the launching process checks first, and the run."""

    summary: str
    config_cls: type
    # (config, processes, dry run) -> what the job will do, in a line: fail fast, build presets once
    prepare: Callable[[object, int, bool], str]
    run: Callable[[object], object]


def _experiment_command(experiment) -> DistributedCommand:
    def prepare(cfg, nprocs: int, dry_run: bool = False) -> str:
        from ds_realloc.dataflow.setup import placement_label, plan_run

        auto = cfg.allocation == "auto"
        plan = plan_run(experiment, dataclasses.replace(cfg, allocation="") if auto else cfg, nprocs,
                        weights_free=dry_run)
        if auto:
            return (f"{plan.settings.geometry.rows} rows per step on {nprocs} ranks; allocation=auto: the planner "
                    f"chooses at start-up every allocation not set by hand")
        return (f"{plan.settings.geometry.rows} rows per step on {nprocs} ranks; " +
                "; ".join(f"{name} {placement_label(a, a.zero_stage if a.zero_stage is not None else cfg.engine.zero_stage)}"
                          for name, a in plan.allocations.items()))

    def run(cfg):
        from ds_realloc.dataflow.runner import run_experiment

        predicted = {}
        if cfg.allocation == "auto":
            from ds_realloc.planner.auto import resolve_auto

            cfg, predicted = resolve_auto(experiment, cfg)
        return run_experiment(experiment, cfg, predicted)

    return DistributedCommand(experiment.summary, experiment.config_cls, prepare, run)


def _generate_command() -> DistributedCommand:
    from ds_realloc.dataflow import generation

    def prepare(cfg, nprocs: int, dry_run: bool = False) -> str:
        from transformers import AutoConfig

        from ds_realloc.layout.model import NAMED_CONFIGS
        from ds_realloc.models.presets import resolve_model_path

        named = dry_run and cfg.model in NAMED_CONFIGS
        config = NAMED_CONFIGS[cfg.model] if named else AutoConfig.from_pretrained(
            resolve_model_path(cfg.model, field="model"))
        layout = generation.generation_layout(cfg.tp, nprocs, config)
        return f"generation on {layout.strategy} over {nprocs} ranks"

    return DistributedCommand("generate completions on a d x t layout (each rank reads only its shard)",
                              generation.GenerateConfig, prepare, generation.run_generate)


def distributed_commands() -> dict[str, DistributedCommand]:
    """The commands that run on every rank: the registered experiments and `generate`."""
    from ds_realloc.dataflow.catalog import builtin_experiments

    commands = {name: _experiment_command(e) for name, e in builtin_experiments().items()}
    commands["generate"] = _generate_command()
    return commands


def distributed_command(name: str) -> DistributedCommand:
    """A built-in distributed command, or the experiment `module:NAME`."""
    from ds_realloc.dataflow.catalog import find_experiment, is_external

    return _experiment_command(find_experiment(name)) if is_external(name) else distributed_commands()[name]


def parse_run_args(config_cls: type, args: Sequence[str]):
    """A config from `[CONFIG.yaml] [key=value ...]` plus the flags --resume and --deepspeed_config."""
    from ds_realloc.utils.config import load_config

    yaml_path, overrides = None, []
    args = list(args)
    while args:
        arg = args.pop(0)
        if arg == "--resume":
            overrides.append("output.resume=true")
        elif arg == "--deepspeed_config" or arg.startswith("--deepspeed_config="):
            value = arg.partition("=")[2] or (args.pop(0) if args else "")
            overrides.append(f"engine.deepspeed_config={value}")
        elif arg.startswith("--"):  # --key value, --key=value, or a bare --flag (= true)
            key, sep, value = arg[2:].partition("=")
            if not sep:
                value = args.pop(0) if args and not args[0].startswith("--") and "=" not in args[0] else "true"
            overrides.append(f"{key}={value}")
        elif "=" in arg:
            overrides.append(arg)
        elif arg.endswith((".yaml", ".yml")) and yaml_path is None:
            yaml_path = arg
        else:
            raise UserError(f"unexpected argument '{arg}': expected CONFIG.yaml, key=value or --key value")
    return load_config(config_cls, yaml_path, overrides)


def launch_workers(nprocs: int, argv: Sequence[str]) -> int:
    """Start `nprocs` ranks of `ds-realloc <argv>` on this machine with torchrun; when one fails,
    torchrun stops the others, so the job ends instead of hanging. Returns the exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nprocs)))
    os.environ["LOCAL_SIZE"] = str(nprocs)  # all on this host: DeepSpeed's shared-memory all-reduce (comm.shm)
    args = get_args_parser().parse_args(["--standalone", "--nnodes=1", f"--nproc_per_node={nprocs}",
                                         "--module", "ds_realloc", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"ds-realloc {argv[0]}: rank {rank} failed with exit code {failure.exitcode}; "
              f"the job was stopped (the rank's message is above)", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def _run_distributed(name: str, command: DistributedCommand, args: Sequence[str]) -> int:
    from ds_realloc.utils.config import format_help
    from ds_realloc.utils.dist import COMMAND_START_VAR, command_start_time, shutdown_distributed, under_launcher

    if "--help" in args or "-h" in args:
        print(f"ds-realloc {name}: {command.summary}\n\n"
              f"usage: ds-realloc {name} [CONFIG.yaml] [key=value | --key value ...]\n\n"
              f"config fields:\n{format_help(command.config_cls)}")
        return 0
    dry_run = "--dry-run" in args
    args = [a for a in args if a != "--dry-run"]
    cfg = parse_run_args(command.config_cls, args)
    launch = getattr(cfg, "launch", cfg)
    if dry_run:  # everything the launching process checks, for the world the command line is written for
        world = launch.nprocs or int(os.environ.get("WORLD_SIZE", 0)) or launch.resolved_nprocs()
        print(f"ds-realloc {name}: dry run ok: {command.prepare(cfg, world, True)}")
        return 0
    if under_launcher():
        command.run(cfg)
        shutdown_distributed()
        return 0
    nprocs = launch.resolved_nprocs()
    start = os.environ.get(COMMAND_START_VAR)
    os.environ[COMMAND_START_VAR] = repr(command_start_time())  # the ranks' summary.json wall_s counts from here
    try:
        command.prepare(cfg, nprocs)
        return launch_workers(nprocs, [name, *args])
    finally:
        if start is None:
            os.environ.pop(COMMAND_START_VAR)
        else:
            os.environ[COMMAND_START_VAR] = start


def _benchmarks() -> dict:
    """Each benchmark's module: `main(args)`, `CONFIG` (its config class) and a docstring."""
    from ds_realloc.bench import generate, ops, planner, realloc, rlhf

    return {"realloc": realloc, "generate": generate, "rlhf": rlhf, "ops": ops, "planner": planner}


def _tool_help(name: str, config_cls: type, summary: str) -> None:
    from ds_realloc.utils.config import format_help

    print(f"ds-realloc {name}: {summary}\n\nusage: ds-realloc {name} [key=value ...] [--json]\n\n"
          f"fields:\n{format_help(config_cls)}")


def _bench(args: Sequence[str]) -> int:
    benchmarks = _benchmarks()
    if not args or args[0] not in benchmarks:
        raise UserError(f"bench needs a benchmark name: {', '.join(benchmarks)}")
    module = benchmarks[args[0]]
    if "--help" in args or "-h" in args:
        _tool_help(f"bench {args[0]}", module.CONFIG, module.__doc__.strip().splitlines()[0])
        return 0
    return module.main(list(args[1:]))


def _plan_stats(args: Sequence[str]) -> int:
    import json

    from ds_realloc.layout.model import NAMED_CONFIGS
    from ds_realloc.layout.report import PlanStatsConfig, format_plan_report, plan_report
    from ds_realloc.utils.config import load_config

    if "--help" in args or "-h" in args:
        _tool_help("plan-stats", PlanStatsConfig, "statistics of a reallocation plan, without processes")
        return 0
    cfg = load_config(PlanStatsConfig, None, [a for a in args if a != "--json"])
    if cfg.model in NAMED_CONFIGS:
        hf_config = NAMED_CONFIGS[cfg.model]
    else:
        from pathlib import Path

        from transformers import AutoConfig

        from ds_realloc.models.presets import resolve_model_path

        path = Path(cfg.model)
        hf_config = AutoConfig.from_pretrained(path.parent if path.name == "config.json" else
                                               resolve_model_path(cfg.model, field="model"))
    report = plan_report(hf_config, cfg)
    print(json.dumps(report, indent=2) if "--json" in args else format_plan_report(report))
    return 0


def _plan(args: Sequence[str]) -> int:
    import json

    from ds_realloc.dataflow.catalog import find_experiment
    from ds_realloc.planner.report import PLAN_FIELDS, PlanConfig, format_plan, plan_report
    from ds_realloc.utils.config import load_config

    if not args or args[0].startswith("-"):
        if "--help" in args or "-h" in args:
            _tool_help("plan <command>", PlanConfig, "the planner's allocations for a command (no processes)")
            return 0
        raise UserError("plan needs a command to plan, e.g. ds-realloc plan ppo world=8 device=h100")
    experiment = find_experiment(args[0])
    if "--help" in args[1:] or "-h" in args[1:]:
        _tool_help(f"plan {args[0]}", PlanConfig, "the planner's allocations for a command (no processes); any "
                   f"field of `ds-realloc {args[0]} --help` may be set too")
        return 0
    rest = [a for a in args[1:] if a != "--json"]
    ours = [a.lstrip("-") for a in rest if a.lstrip("-").partition("=")[0] in PLAN_FIELDS]
    theirs = [a for a in rest if a.lstrip("-").partition("=")[0] not in PLAN_FIELDS]
    report = plan_report(experiment, parse_run_args(experiment.config_cls, theirs), load_config(PlanConfig, None, ours))
    print(json.dumps(report, indent=2) if "--json" in args else format_plan(report))
    return 0


def _profile(args: Sequence[str]) -> int:
    import json

    from ds_realloc.planner.measure import main
    from ds_realloc.planner.profile_config import ProfileConfig
    from ds_realloc.utils.config import load_config

    if "--help" in args or "-h" in args:
        _tool_help("profile", ProfileConfig, "measure this machine into a device profile for the planner")
        return 0
    data = main(load_config(ProfileConfig, None, [a for a in args if a != "--json"]))
    print(json.dumps(data, indent=2))
    return 0


def _timeline(args: Sequence[str]) -> int:
    """`ds-realloc timeline RUN_DIR [--plan] [step=N] [out=FILE.svg] [device=...]`: a run's measured timeline as SVG."""
    from ds_realloc.planner.timeline import TimelineConfig, draw_run
    from ds_realloc.utils.config import load_config

    if "--help" in args or "-h" in args or not args or args[0].startswith("-") or "=" in args[0]:
        _tool_help("timeline RUN_DIR [--plan]", TimelineConfig, "a run's measured timeline per rank (SVG); with "
                   "--plan beside the planner's prediction for the run's allocation")
        if "--help" in args or "-h" in args:
            return 0
        raise UserError("timeline needs the folder of a run, e.g. ds-realloc timeline runs/ppo --plan")
    cfg = load_config(TimelineConfig, None, [a for a in args[1:] if a != "--plan"])
    print(draw_run(args[0], cfg, with_plan="--plan" in args))
    return 0


def _prepare_model(args: Sequence[str]) -> int:
    from ds_realloc.models.presets import EMBEDDED_DEFAULT, resolve_model_path

    print(resolve_model_path(args[0] if args else EMBEDDED_DEFAULT, field="prepare-model"))
    return 0


def _ops(args: Sequence[str]) -> int:
    """`ds-realloc ops [--json]`: every kernel, like DeepSpeed's ds_report (building the compatible ones)."""
    import json

    from ds_realloc.ops import op_report

    rows = op_report()
    if "--json" in args:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'op':<15}{'device':<8}{'compatible':<12}{'built':<7}{'loaded':<8}path / error")
    for r in rows:
        where = r["path"] or r["error"] or ("DS_REALLOC_DISABLE_OPS=1" if r["disabled"] else "")
        print(f"{r['op']:<15}{r['device']:<8}{str(r['compatible']):<12}{str(r['built']):<7}{str(r['loaded']):<8}"
              f"{where}")
    return 0


TOOLS = {"prepare-model": _prepare_model, "plan-stats": _plan_stats, "plan": _plan, "profile": _profile, "bench": _bench,
         "ops": _ops, "timeline": _timeline}


def commands() -> dict[str, Callable[[Sequence[str]], int]]:
    """Every command by name: what `ds-realloc <name> <args>` calls with <args>."""
    table: dict[str, Callable[[Sequence[str]], int]] = {
        name: functools.partial(_run_distributed, name, command) for name, command in distributed_commands().items()}
    return {**table, **TOOLS}


def _without_local_rank(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` / `--local_rank N`, which the deepspeed launcher inserts (LOCAL_RANK is in the env)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--local_rank":
            skip = True
        elif not arg.startswith("--local_rank="):
            kept.append(arg)
    return kept


def _deepspeed_logs_to_stderr() -> None:
    """DeepSpeed's logger writes to the stdout of its import (e.g. 'Setting accelerator to CPU'); importing
    it with stdout pointed at stderr keeps a --json command's stdout the JSON alone."""
    import contextlib
    import importlib

    with contextlib.redirect_stdout(sys.stderr):
        importlib.import_module("deepspeed.utils.logging")


def main(argv: Sequence[str] | None = None) -> None:
    argv = _without_local_rank(list(sys.argv[1:] if argv is None else argv))
    # DeepSpeed calls collectives that torch >= 2.13 renamed; the warnings are not ours to act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if not argv or argv[0] in ("-h", "--help", "help"):
        listing = "\n".join(f"  {name:<27} {c.summary}" for name, c in distributed_commands().items())
        print(USAGE.format(commands=listing, benchmarks=", ".join(_benchmarks())))
        sys.exit(0 if argv else 2)
    command, args = argv[0], argv[1:]
    if "--json" in args:
        _deepspeed_logs_to_stderr()
    try:
        table = commands()
        if command not in table and ":" in command:
            table[command] = functools.partial(_run_distributed, command, distributed_command(command))
        if command not in table:
            raise UserError(f"unknown command '{command}'; commands: {', '.join(table)}")
        code = table[command](args)
    except UserError as e:
        from ds_realloc.utils.logging import env_rank

        prefix = f"[rank {env_rank()}] " if "RANK" in os.environ else ""
        sys.stderr.write(f"{prefix}ds-realloc {command}: error: {e}\n")  # one write: ranks do not interleave
        sys.stderr.flush()
        sys.exit(2)
    sys.exit(code)
