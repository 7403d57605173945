"""`allocation=auto`: the planner chooses every allocation a run does not set by hand, at start-up.

Rank 0 plans; every rank receives the same plan (a stochastic search must not run per rank) or the
same error. The plan is searched with this machine's device profile: a built-in one on a known GPU,
else the profile `ds-realloc profile` measured here, with the run's models' calls timed (measured
once, on rank 0's host, and kept in the cache like the plans). Plans are cached by everything they
depend on (the command's config, the world, the profile), so a second run starts without searching.
Settings given by hand (`allocations.<mfc>.*`) always win; the log says which came from where.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from ds_realloc.dataflow.allocation import AllocationConfig
from ds_realloc.dataflow.experiment import Experiment
from ds_realloc.models.presets import cache_dir, resolve_model_path
from ds_realloc.planner.profile import BUILTIN, DeviceProfile, load_profile
from ds_realloc.utils.config import to_dict
from ds_realloc.utils.dist import init_distributed
from ds_realloc.utils.errors import ConfigError
from ds_realloc.utils.logging import get_logger

logger = get_logger(__name__)

AUTO = "auto"
_NOT_PLAN_INPUTS = ("output", "launch", "allocation")  # config groups that change no allocation


# 2: piecewise-linear fits; 3: engines data-parallel over all ranks timed too; 4: a step's boundary work apart
# from its micro-batches, ZeRO-1 timed; another format is re-measured
PROFILE_FORMAT = 4


def machine_profile_path(world: int) -> Path:
    return cache_dir() / "profiles" / f"{socket.gethostname()}-{world}ranks-v{PROFILE_FORMAT}.json"


def _builtin_for_this_gpu() -> DeviceProfile | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().lower()
    return next((p for key, p in BUILTIN.items() if key in name), None)


def model_paths(experiment: Experiment, cfg) -> list[Path]:
    """The distinct model folders of a command's roles."""
    paths = []
    for spec in experiment.roles(cfg):
        path = resolve_model_path(spec.path, spec.path_field)
        if path not in paths:
            paths.append(path)
    return paths


def machine_profile(experiment: Experiment, cfg, world: int) -> DeviceProfile:
    """This machine's profile with the command's models timed: read from the cache, measured where missing
    (rank 0 only: it spawns its own ranks)."""
    builtin = _builtin_for_this_gpu()
    if builtin is not None:
        return builtin
    from transformers import AutoConfig

    from ds_realloc.engine.ds_config import auto_dtype
    from ds_realloc.planner.calibrated import signature
    from ds_realloc.planner.cost import ModelShape
    from ds_realloc.planner.measure import measure
    from ds_realloc.planner.measure_calls import measure_model
    from ds_realloc.planner.profile_config import ProfileConfig

    path = machine_profile_path(world)
    dtype = auto_dtype() if cfg.engine.dtype == "auto" else cfg.engine.dtype
    profile = load_profile(str(path)) if path.is_file() else None
    base = ProfileConfig(ranks=world, dtype=dtype)
    if profile is None:
        logger.info("allocation=auto: measuring this machine for the planner (once; kept in %s)", path)
        profile = measure(base)
    models = dict(profile.models)
    for model in model_paths(experiment, cfg):
        if signature(ModelShape.of(AutoConfig.from_pretrained(model)), dtype) not in models:
            logger.info("allocation=auto: timing the calls of %s for the planner (once)", model)
            models.update(measure_model(dataclasses.replace(base, model=str(model)), model))
    if models != dict(profile.models):
        profile = dataclasses.replace(profile, models=models)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(profile.to_json(), indent=2) + "\n")
    return profile


def plan_key(experiment: Experiment, cfg, world: int, profile: DeviceProfile) -> str:
    tree = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_PLAN_INPUTS}
    blob = json.dumps({"command": experiment.command, "config": tree, "world": world, "profile": profile.to_json(),
                       "planner": 1}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def typical_prompt_len(experiment: Experiment, cfg, world: int) -> int:
    """The prompt length generation pads to, on average: the longest prompt among each rank's rows of a
    step, over the first steps of the run's own data order."""
    from ds_realloc.dataflow.setup import load_data

    data = load_data(experiment, cfg, resolve_model_path(experiment.roles(cfg)[0].path, "model.path"))
    lengths = []
    for step in range(min(8, data.total_steps)):
        batch = [len(data.train_set[i].prompt_ids) for i in data.sampler.global_batch(step)]
        share = max(1, len(batch) // world)
        lengths += [max(batch[i:i + share]) for i in range(0, len(batch), share)]
    return round(sum(lengths) / len(lengths)) if lengths else cfg.data.max_prompt_len


def plan_for(experiment: Experiment, cfg, world: int) -> dict:
    """Rank 0's plan for the run: the `plan` report of its config (read from the cache when planned before)."""
    from ds_realloc.planner.report import PlanConfig, plan_report

    profile = machine_profile(experiment, cfg, world)
    manual = dataclasses.replace(cfg, allocation="")
    key = plan_key(experiment, manual, world, profile)
    cached = cache_dir() / "plans" / f"{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    pcfg = PlanConfig(world=world, device=profile.name, prompt_len=typical_prompt_len(experiment, manual, world))
    report = plan_report(experiment, manual, pcfg, profile)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(report, indent=2) + "\n")
    return report


def apply_plan(cfg, report: dict):
    """The config with the plan's allocations where the config sets none by hand; and a line per MFC
    saying where its allocation came from."""
    allocations = dict(cfg.allocations)
    sources = {}
    for name, chosen in report["allocations"].items():
        if name in report["fixed_by_config"]:
            sources[name] = f"allocations.{name} (set by hand)"
            continue
        allocations[name] = AllocationConfig(**chosen)
        sources[name] = "the planner"
    return dataclasses.replace(cfg, allocation="", allocations=allocations), sources


def resolve_auto(experiment: Experiment, cfg) -> tuple[object, dict[str, float]]:
    """On every rank: the run's config with the planner's allocations, and the predicted seconds per MFC."""
    rank, world = init_distributed(cfg.launch.dist_timeout_s)
    payload: list = [None]
    if rank == 0:
        try:
            payload[0] = {"report": plan_for(experiment, cfg, world)}
        except ConfigError as e:
            payload[0] = {"error": str(e)}
    dist.broadcast_object_list(payload, src=0)
    if "error" in payload[0]:
        raise ConfigError(f"allocation=auto: {payload[0]['error']}")
    report = payload[0]["report"]
    planned, sources = apply_plan(cfg, report)
    if rank == 0:
        logger.info("allocation=auto (%s, searched in %.1f s): predicted step %.3f s; %s", report["device"],
                    report["search_s"], report["predicted_step_s"],
                    "; ".join(f"{name}: {_label(entry)} from {sources[name]}"
                              for name, entry in report["allocations"].items()))
    return planned, dict(report["predicted_mfc_s"])


def _label(entry: dict) -> str:
    extra = f" zero{entry['zero_stage']} micro{entry['micro_batch_size']}" if "zero_stage" in entry else ""
    return f"{entry['strategy']}@[{entry['mesh']}]{extra}"
