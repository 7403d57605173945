"""Where each model function call runs: a mesh and a strategy per MFC, checked before any work.

`allocations.<mfc>.mesh` / `.strategy` set one MFC; `allocation: d2t2` sets every generate and
inference MFC at once. The default works on any world size: generation and inference run one
replica per rank (d<world>) on all ranks; training runs ZeRO-3 over all ranks, except that when
several models train (PPO's actor and critic) and the world splits evenly between them, each trains
on its own equal, contiguous share of the ranks, so the trainings run at the same time instead of
one after the other (ReaLHF's observation: two half-size data-parallel groups side by side beat
two full-world ones in turn, as each moves half the gradient traffic).
Training MFCs run DeepSpeed ZeRO data parallel over their mesh (`zero3` or `d<n>`: the strategy
names the mesh's data parallelism; the ZeRO stage is `allocations.<mfc>.zero_stage`, else
`engine.zero_stage`, and the rows per forward `allocations.<mfc>.micro_batch_size`, else
`train.micro_batch_size`); generate and inference MFCs run on `d<dp>t<tp>` layouts. A scoring call
on a training engine (the recompute of old log-probs or values) shares its trainer's settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from ds_realloc.comm.batches import RowSplit
from ds_realloc.dataflow.mfc import MFC, MFCKind
from ds_realloc.layout.layout import Layout
from ds_realloc.layout.mesh import DeviceMesh, Strategy, parse_mesh, parse_strategy
from ds_realloc.layout.model import ModelSpec
from ds_realloc.utils.config import option
from ds_realloc.utils.errors import ConfigError


@dataclass
class AllocationConfig:
    mesh: str = option("", "ranks of this call, e.g. 0-3 or 0,2 ('' = all ranks)")
    strategy: str = option("", "d<dp>t<tp> for generate / inference calls (e<ep>: experts of an MoE model split "
                               "over data-parallel ranks, e.g. d2e2); zero3, zero3:d<dp> or d<n> for training "
                               "('' = the default)")
    zero_stage: int = option(-1, "training MFCs: this engine's DeepSpeed ZeRO stage 0-3 (-1 = engine.zero_stage)")
    micro_batch_size: int = option(0, "training MFCs: samples per rank per forward of this engine "
                                      "(0 = train.micro_batch_size)")


@dataclass(frozen=True)
class Allocation:
    mfc: MFC
    mesh: DeviceMesh
    strategy: Strategy
    zero_stage: int | None = None  # training engines: set per MFC (None = engine.zero_stage)
    micro_batch_size: int | None = None  # training engines: set per MFC (None = train.micro_batch_size)

    @property
    def dp_groups(self) -> tuple[tuple[int, ...], ...]:
        """The ranks of each data-parallel group (a group shares its rows), in dp order."""
        if self.mfc.kind.on_engine:
            return tuple((rank,) for rank in self.mesh.ranks)
        s = self.strategy
        return tuple(tuple(self.mesh.ranks[s.index(dp, tp, 0)] for tp in range(s.tp)) for dp in range(s.dp))

    def split(self, rows: int) -> RowSplit:
        return RowSplit(self.dp_groups, rows)


def _strategy(mfc: MFC, text: str, mesh: DeviceMesh, where: str) -> Strategy:
    strategy = parse_strategy(text, mesh.size, where=where)
    if mfc.kind is MFCKind.TRAIN:
        if strategy.tp != 1 or strategy.pp != 1 or strategy.ep != 1:
            raise ConfigError(f"{where}: training runs DeepSpeed ZeRO data parallel (zero3, zero3:d<n> or d<n>), "
                              f"got {text}")
        if strategy.zero3 and strategy.dp != mesh.size:
            raise ConfigError(f"{where}: a training engine's ZeRO partitions span its whole mesh ({mesh.size} ranks), "
                              f"got {text}")
    elif strategy.zero3 or strategy.pp != 1:
        raise ConfigError(f"{where}: {mfc.kind.value} calls run on d<dp>t<tp> layouts, got {text}")
    return strategy


def _engine_settings(mfc: MFC, config: AllocationConfig, where: str) -> tuple[int | None, int | None]:
    """The per-MFC ZeRO stage and micro-batch size of a training MFC (None where unset)."""
    stage, micro = config.zero_stage, config.micro_batch_size
    if mfc.kind is not MFCKind.TRAIN:
        for name, value, unset in (("zero_stage", stage, -1), ("micro_batch_size", micro, 0)):
            if value != unset:
                raise ConfigError(f"{where}.{name}: only training MFCs run a DeepSpeed engine; {mfc.name} is a "
                                  f"{mfc.kind.value} call")
        return None, None
    if stage not in (-1, 0, 1, 2, 3):
        raise ConfigError(f"{where}.zero_stage: must be 0, 1, 2 or 3 (or -1: engine.zero_stage), got {stage}")
    if micro < 0:
        raise ConfigError(f"{where}.micro_batch_size: must be at least 1 (or 0: train.micro_batch_size), got {micro}")
    return (None if stage == -1 else stage), (micro or None)


def default_train_meshes(train_mfcs: Sequence[str], world: int) -> dict[str, DeviceMesh]:
    """Equal contiguous shares of the world, one per training MFC, where the world splits evenly
    between several; else every training MFC on all ranks."""
    if len(train_mfcs) < 2 or world % len(train_mfcs):
        return {name: DeviceMesh(tuple(range(world))) for name in train_mfcs}
    share = world // len(train_mfcs)
    return {name: DeviceMesh(tuple(range(i * share, (i + 1) * share))) for i, name in enumerate(train_mfcs)}


def resolve_allocations(mfcs: Sequence[MFC], world: int, shorthand: str, per_mfc: Mapping[str, AllocationConfig],
                        models: Mapping[str, ModelSpec], rows: int, train_rows_multiple: int = 1,
                        slots_per_host: Sequence[int] | None = None) -> dict[str, Allocation]:
    """Every MFC's allocation, validated: meshes inside the world, strategies that fit their meshes,
    tensor parallelism the model's heads allow, rows that split over the data-parallel groups.
    `slots_per_host` places hostfile-relative meshes (`node1:0-3`)."""
    names = {m.name for m in mfcs}
    for name in per_mfc:
        if name not in names:
            raise ConfigError(f"allocations.{name}: there is no MFC '{name}'; MFCs: {', '.join(sorted(names))}")
    everyone = DeviceMesh(tuple(range(world)))
    train_meshes = default_train_meshes([m.name for m in mfcs if m.kind is MFCKind.TRAIN], world)
    allocations = {}
    trainers = {m.role: m.name for m in mfcs if m.kind is MFCKind.TRAIN}
    for mfc in [m for m in mfcs if m.kind is not MFCKind.SCORE]:
        config = per_mfc.get(mfc.name, AllocationConfig())
        where = f"allocations.{mfc.name}"
        mesh = parse_mesh(config.mesh, slots_per_host, where=f"{where}.mesh") if config.mesh else train_meshes.get(mfc.name, everyone)
        outside = [r for r in mesh.ranks if r >= world]
        if outside:
            raise ConfigError(f"{where}.mesh: rank {outside[0]} is outside the world of {world} ranks")
        has_model = mfc.role in models
        default = "zero3" if mfc.kind is MFCKind.TRAIN else ((shorthand if has_model else "") or f"d{mesh.size}")
        text = config.strategy or default
        from_shorthand = shorthand and has_model and not config.strategy and mfc.kind is not MFCKind.TRAIN
        field = f"allocation ({mfc.name})" if from_shorthand else f"{where}.strategy"
        strategy = _strategy(mfc, text, mesh, field)
        if not has_model and (strategy.tp > 1 or strategy.ep > 1):
            raise ConfigError(f"{field}: {mfc.name} runs no model, so it has no tensor or expert parallelism; "
                              f"use d{mesh.size}")
        allocation = Allocation(mfc, mesh, strategy, *_engine_settings(mfc, config, where))
        groups = len(allocation.dp_groups)
        if rows % groups:
            raise ConfigError(f"{where}: {groups} data-parallel groups do not divide the {rows} samples of a step "
                              f"(train.batch_size x samples per prompt)")
        if (mfc.kind is MFCKind.TRAIN or mfc.whole_groups) and (rows // groups) % train_rows_multiple:
            raise ConfigError(f"{where}: each of the {groups} data-parallel groups gets {rows // groups} samples, "
                              f"not a multiple of the {train_rows_multiple} samples of one prompt")
        if mfc.kind is not MFCKind.TRAIN and mfc.role in models and (strategy.tp > 1 or strategy.ep > 1):
            try:  # the shard rules raise when tp does not fit the heads (GQA included) or the MLP, ep the experts
                Layout(models[mfc.role], mesh, strategy, fused=True).buffers(mesh.ranks[0])
            except ConfigError as e:
                raise ConfigError(f"{field}: {text}: {e}") from None
        allocations[mfc.name] = allocation
    for mfc in [m for m in mfcs if m.kind is MFCKind.SCORE]:  # on the engine its role trains with
        if mfc.name in per_mfc:
            raise ConfigError(f"allocations.{mfc.name}: {mfc.name} runs on the training engine of "
                              f"{trainers.get(mfc.role, mfc.role)}; set allocations.{trainers.get(mfc.role)} instead")
        trainer = allocations[trainers[mfc.role]]
        allocations[mfc.name] = Allocation(mfc, trainer.mesh, trainer.strategy, trainer.zero_stage,
                                           trainer.micro_batch_size)
    return {m.name: allocations[m.name] for m in mfcs}
