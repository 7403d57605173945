"""The models of a run by role: a DeepSpeed engine on the ranks of the role's training mesh (trained
roles) or of its first inference call (frozen roles), and on every rank a hybrid engine that moves
the role's weights into the layout of each generate / inference call.

A role's version counts its training calls; every rank walks the same MFC order, so all agree on
it, and an inference copy made at one version can be kept until the next training call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import AutoConfig

from ds_realloc.algorithms.geometry import StepGeometry
from ds_realloc.dataflow.allocation import Allocation
from ds_realloc.dataflow.config import RunConfig
from ds_realloc.dataflow.experiment import RoleSpec
from ds_realloc.dataflow.mfc import MFC, MFCKind
from ds_realloc.engine.config import EngineConfig
from ds_realloc.engine.ds_config import BatchGeometry, frozen_ds_config, lr_schedule, torch_dtype, train_ds_config, zero_stage
from ds_realloc.engine.factory import build_frozen_model, build_train_engine
from ds_realloc.engine.hybrid import HybridEngine
from ds_realloc.layout.mesh import DeviceMesh
from ds_realloc.models.registry import family_of
from ds_realloc.utils.config import FieldInvalid
from ds_realloc.utils.dist import group_of
from ds_realloc.utils.errors import ConfigError


@dataclass
class Role:
    spec: RoleSpec
    path: Path
    hf_config: Any
    mesh: DeviceMesh  # where the role's engine lives
    ds_config: dict
    engine: Any = None  # trained roles, on their mesh
    frozen: Any = None  # frozen roles, on their mesh
    hybrid: HybridEngine | None = None
    version: int = 0

    @property
    def module(self):
        if self.engine is not None:
            return self.engine.module
        return self.frozen.module if self.frozen is not None else None

    @property
    def ds_engine(self):
        """The DeepSpeed engine holding the role's module on this rank (None off its mesh or for a replica)."""
        return self.engine if self.engine is not None else getattr(self.frozen, "_engine", None)

    @property
    def group(self):
        """The process group of the role's mesh (None on ranks outside it)."""
        return group_of(self.mesh.ranks) if dist.get_rank() in self.mesh.ranks else None


def engine_of(engine: EngineConfig, allocation: Allocation) -> EngineConfig:
    """The engine settings of a training MFC: `engine`, with the MFC's own ZeRO stage where it sets one."""
    if allocation.zero_stage is None or allocation.zero_stage == engine.zero_stage:
        return engine
    own = replace(engine, zero_stage=allocation.zero_stage)
    try:
        own.validate()
    except FieldInvalid as e:
        raise ConfigError(f"allocations.{allocation.mfc.name}.zero_stage={allocation.zero_stage}: "
                          f"engine.{e.field}: {e.message}") from None
    return own


def _trained_allocation(spec: RoleSpec, mfcs: list[MFC], allocations: dict[str, Allocation]) -> Allocation | None:
    return next((allocations[m.name] for m in mfcs if m.role == spec.role and m.kind is MFCKind.TRAIN), None)


def _role_mesh(spec: RoleSpec, mfcs: list[MFC], allocations: dict[str, Allocation]) -> DeviceMesh:
    calls = [m for m in mfcs if m.role == spec.role]
    trained = [m for m in calls if m.kind is MFCKind.TRAIN]
    return allocations[(trained or calls)[0].name].mesh


def build_roles(specs: list[RoleSpec], paths: dict[str, Path], mfcs: list[MFC], allocations: dict[str, Allocation],
                cfg: RunConfig, geometry: StepGeometry, total_optimizer_steps: int, pad_id: int) -> dict[str, Role]:
    """Engines on the ranks of each role's mesh, hybrid engines everywhere. Trained roles first, in
    the given order, so every rank builds its engines in the same order."""
    rank = dist.get_rank()
    roles: dict[str, Role] = {}
    reference_config = None
    for spec in sorted(specs, key=lambda s: not s.trainable):
        mesh = _role_mesh(spec, mfcs, allocations)
        trained = _trained_allocation(spec, mfcs, allocations) if spec.trainable else None
        own = geometry.with_micro_batch(trained.micro_batch_size if trained else None)
        batch = BatchGeometry(own.micro_batch(mesh.size), own.accumulation(mesh.size), mesh.size)
        if trained is not None:
            ds_config = train_ds_config(engine_of(cfg.engine, trained), spec.optim or cfg.optim, batch,
                                        total_optimizer_steps)
            reference_config = reference_config or ds_config
        else:
            ds_config = frozen_ds_config(reference_config or train_ds_config(cfg.engine, cfg.optim, batch, 1),
                                         spec.offload, batch)
        hf_config = AutoConfig.from_pretrained(paths[spec.role])
        family_of(hf_config, where=str(paths[spec.role] / "config.json"))
        role = Role(spec, paths[spec.role], hf_config, mesh, ds_config)
        if rank in mesh.ranks:
            group = group_of(mesh.ranks)
            if spec.trainable:
                role.engine = build_train_engine(paths[spec.role], spec.head, ds_config,
                                                 lr_schedule(spec.optim or cfg.optim, total_optimizer_steps),
                                                 cfg.engine.gradient_checkpointing, pad_id, group,
                                                 cfg.engine.router_aux_loss_coef)
            else:
                role.frozen = build_frozen_model(paths[spec.role], spec.head, ds_config, spec.offload, pad_id, group)
        role.hybrid = HybridEngine(role.module, hf_config, spec.head == "value", mesh, torch_dtype(ds_config),
                                   zero3=zero_stage(ds_config) == 3)
        roles[spec.role] = role
    return roles
