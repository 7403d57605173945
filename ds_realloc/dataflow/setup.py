"""Everything a run decides before its first step: the models' folders, every MFC's allocation and
the step's geometry (checked before any process starts work), then on each rank the data, the
roles' engines and the interfaces."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from transformers import AutoConfig, AutoTokenizer

from ds_realloc.data.datasets import ChatFormatter, load_records, tokenize_records
from ds_realloc.data.sampler import StepSampler
from ds_realloc.dataflow.allocation import Allocation, resolve_allocations
from ds_realloc.dataflow.config import RunConfig
from ds_realloc.dataflow.experiment import Experiment, InterfaceContext, RunSettings
from ds_realloc.dataflow.mfc import MFCKind, topological_order
from ds_realloc.dataflow.roles import Role, build_roles, engine_of
from ds_realloc.engine.ds_config import zero_stage
from ds_realloc.layout.model import NAMED_CONFIGS, model_spec
from ds_realloc.models.presets import resolve_model_path
from ds_realloc.utils.config import to_dict
from ds_realloc.utils.dist import group_of, slots_per_host
from ds_realloc.utils.errors import ConfigError
from ds_realloc.utils.logging import get_logger

logger = get_logger(__name__)

_FRESH_RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "tensorboard", "checkpoints", "hf", "timeline")


@dataclass(frozen=True)
class RunPlan:
    paths: dict[str, Path | None]  # role -> HF folder (None: a weights-free named config, dry runs only)
    allocations: dict[str, Allocation]  # MFC name -> allocation, in topological order
    settings: RunSettings


def plan_run(experiment: Experiment, cfg: RunConfig, world: int, weights_free: bool = False) -> RunPlan:
    """Each role's model folder, the allocation of every MFC and the step's geometry, validated. With
    `weights_free` (a dry run), a model may be a named size (`llama-7b` ...: its config alone)."""
    specs = experiment.roles(cfg)
    paths = {spec.role: None if weights_free and spec.path in NAMED_CONFIGS else
             resolve_model_path(spec.path, spec.path_field) for spec in specs}
    configs = {s.role: NAMED_CONFIGS[s.path] if paths[s.role] is None else AutoConfig.from_pretrained(paths[s.role])
               for s in specs}
    models = {s.role: model_spec(configs[s.role], value_head=s.head == "value") for s in specs}
    settings = experiment.settings(cfg)
    geometry = settings.geometry
    allocations = resolve_allocations(topological_order(experiment.mfcs(cfg)), world, cfg.allocation,
                                      cfg.allocations, models, geometry.rows,
                                      geometry.samples_per_prompt if experiment.group_train_rows else 1,
                                      slots_per_host(world, cfg.launch.hostfile))
    for allocation in allocations.values():
        if allocation.mfc.kind is MFCKind.TRAIN:
            name, micro = allocation.mfc.name, allocation.micro_batch_size
            geometry.with_micro_batch(micro).check(name, allocation.mesh.size, f"allocations.{name}.micro_batch_size"
                                                   if micro else "train.micro_batch_size")
            stage = engine_of(cfg.engine, allocation).zero_stage
            if settings.offload_train_states and stage != 3:
                raise ConfigError(f"allocations.{name}.zero_stage={stage}: rollout.offload_train_states needs "
                                  f"ZeRO-3 training engines")
    if cfg.engine.inference == "zero3":
        check_engine_inference(allocations, {s.role for s in specs})
    return RunPlan(paths, allocations, settings)


def check_engine_inference(allocations: dict[str, Allocation], roles: set[str]) -> None:
    """engine.inference=zero3 runs each generate / inference call on its model's engine: one replica per
    rank on the mesh the model trains on (or, frozen, its first call's)."""
    meshes: dict[str, Allocation] = {}
    for allocation in allocations.values():
        mfc = allocation.mfc
        if mfc.role in roles and (mfc.kind is MFCKind.TRAIN or mfc.role not in meshes):
            meshes[mfc.role] = allocation
    for allocation in allocations.values():
        mfc = allocation.mfc
        if mfc.role not in roles or mfc.kind.on_engine:
            continue
        home = meshes[mfc.role].mesh
        if allocation.mesh != home or allocation.strategy.tp != 1:
            raise ConfigError(f"allocations.{mfc.name}: engine.inference=zero3 runs {mfc.name} on the {mfc.role} "
                              f"engine itself, so it needs that engine's mesh [{home}] with d{home.size}; got "
                              f"{placement_label(allocation, None)}")


def placement_label(allocation: Allocation, zero_stage: int | None) -> str:
    """`strategy@[mesh]`; training shows its ZeRO stage."""
    strategy = allocation.strategy
    label = f"zero{3 if zero_stage is None else zero_stage}:d{allocation.mesh.size}" if allocation.mfc.kind.on_engine \
        else f"d{strategy.dp}t{strategy.tp}" + (f"e{strategy.ep}" if strategy.ep > 1 else "")
    return f"{label}@[{allocation.mesh}]"


def placement_labels(allocations: dict[str, Allocation], roles: dict[str, Role]) -> dict[str, str]:
    """Every MFC's placement, training ones with the ZeRO stage their engine really runs (accelerate's
    plugin or a --deepspeed_config may have set another than engine.zero_stage)."""
    return {name: placement_label(a, zero_stage(roles[a.mfc.role].ds_config) if a.mfc.role in roles else None)
            for name, a in allocations.items()}


def run_dir(experiment: Experiment, cfg: RunConfig) -> Path:
    return Path(cfg.output.dir or f"runs/{experiment.command}")


def prepare_run_dir(out: Path, cfg: RunConfig, rank: int) -> None:
    """A fresh run replaces the outputs of an earlier run in the same folder; a resumed one appends."""
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.output.resume:
            for name in _FRESH_RUN_OUTPUTS:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    dist.barrier()


@dataclass
class RunData:
    tokenizer: object
    train_set: list
    eval_set: list
    sampler: StepSampler
    total_steps: int


def load_data(experiment: Experiment, cfg: RunConfig, tokenizer_path: Path) -> RunData:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    formatter = ChatFormatter(tokenizer, cfg.data.chat_template)
    train_set, eval_set = (_load_split(experiment, cfg, formatter, split) for split in ("train", "eval"))
    sampler = StepSampler(len(train_set), cfg.train.batch_size, cfg.train.seed)
    return RunData(tokenizer, train_set, eval_set, sampler, cfg.train.max_steps or cfg.train.epochs * sampler.steps_per_epoch)


def _load_split(experiment: Experiment, cfg: RunConfig, formatter: ChatFormatter, split: str) -> list:
    spec = cfg.data.train if split == "train" else cfg.data.eval
    if not spec:
        return []
    records = load_records(spec, split, experiment.data_format)
    limit = cfg.data.max_prompt_len if experiment.data_format == "prompts" else cfg.data.max_seq_len
    return tokenize_records(records, experiment.data_format, formatter, limit, cfg.data.skip_bad_samples)


def build_models(experiment: Experiment, cfg: RunConfig, plan: RunPlan, data: RunData
                 ) -> tuple[dict[str, Role], InterfaceContext]:
    """The roles' engines (their meshes' ranks) and hybrid engines (every rank), and what the
    interfaces are built with."""
    order = [allocation.mfc for allocation in plan.allocations.values()]
    geometry = plan.settings.geometry
    pad_id = data.tokenizer.pad_token_id
    roles = build_roles(experiment.roles(cfg), plan.paths, order, plan.allocations, cfg, geometry,
                        data.total_steps * geometry.optimizer_steps, pad_id)
    groups = {m.name: roles[m.role].group if m.role in roles else _mesh_group(plan.allocations[m.name]) for m in order}
    micro = {name: a.micro_batch_size for name, a in plan.allocations.items()
             if a.mfc.kind is MFCKind.TRAIN and a.micro_batch_size}
    return roles, InterfaceContext(data.tokenizer, pad_id, _eos_ids(data.tokenizer, roles), groups, micro)


def _mesh_group(allocation: Allocation):
    """The process group of an MFC's mesh on its ranks (None elsewhere): for MFCs that run no model."""
    ranks = allocation.mesh.ranks
    return group_of(ranks) if dist.get_rank() in ranks else None


def _eos_ids(tokenizer, roles: dict[str, Role]) -> tuple[int, ...]:
    ids = {tokenizer.eos_token_id}
    for role in roles.values():
        eos = getattr(role.hf_config, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return tuple(sorted(i for i in ids if i is not None))
