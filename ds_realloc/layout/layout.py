"""Layouts: (model, mesh, strategy) -> the flat buffers every rank holds and which parameter
elements each buffer holds where.

- ZeRO-3 (`zero3:d{dp}`): one buffer per parameter; partition i holds flat [i*P, (i+1)*P) with
  P = ceil(N / dp) (DeepSpeed's layout: padding at the tail of the last partitions).
- d{dp}t{tp}p{pp}: stage p holds the parameters of its pipeline units, each split by its shard
  rule for tensor rank t; dp ranks are replicas. With `fused`, q/k/v and gate/up of a layer share
  one buffer ("...qkv_proj.weight", "...gate_up_proj.weight") - just destination offsets. With tied
  embeddings and pp > 1 the last stage holds the embedding's shard as "lm_head.weight". With
  expert parallelism (`e`), an MoE layer's expert tensors hold only the ep rank's block of experts
  (dim 0), each split by its shard rule inside; replicas are then ranks of equal (pp, tp, ep) ranks.

`placement` optionally permutes the global ranks of each tensor-parallel group (see plan.py).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from ds_realloc.layout.mesh import DeviceMesh, Strategy
from ds_realloc.layout.model import ModelSpec, ParamInfo, balanced_stages
from ds_realloc.layout.runs import Run
from ds_realloc.utils.errors import ConfigError


@dataclass(frozen=True)
class Member:
    """The elements of one parameter inside a buffer (Run local offsets are buffer offsets)."""

    param: str
    runs: tuple[Run, ...]


@dataclass(frozen=True)
class BufferSpec:
    name: str
    shape: tuple[int, ...]
    members: tuple[Member, ...]
    unit: int  # pipeline unit: buffers move in unit order, one unit per bucket

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Holding:
    """One way a set of ranks holds a region of a parameter: the buffer and where in it."""

    buffer: str
    runs: tuple[Run, ...]
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class Region:
    """Elements of a parameter held identically by several ranks (replicas); regions of a parameter
    are disjoint. `coverage` identifies the region in full coordinates, [lo, hi) bounds it."""

    coverage: tuple[tuple[int, int, int, int], ...]
    holdings: tuple[Holding, ...]
    lo: int
    hi: int

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted(r for h in self.holdings for r in h.ranks))


_FUSED = {"self_attn.q_proj": ("self_attn.qkv_proj", 0), "self_attn.k_proj": ("self_attn.qkv_proj", 1),
          "self_attn.v_proj": ("self_attn.qkv_proj", 2), "mlp.gate_proj": ("mlp.gate_up_proj", 0),
          "mlp.up_proj": ("mlp.gate_up_proj", 1)}


def _fused_name(param: str) -> tuple[str, int] | None:
    """("model.layers.3.self_attn.qkv_proj.weight", 1) for k_proj.weight; None if not fusable."""
    stem, _, leaf = param.rpartition(".")
    layer, _, module = stem.rpartition(".")
    layer, _, owner = layer.rpartition(".")
    key = f"{owner}.{module}"
    if key not in _FUSED:
        return None
    fused, position = _FUSED[key]
    return f"{layer}.{fused}.{leaf}", position


def _shifted(runs: tuple[Run, ...], offset: int) -> tuple[Run, ...]:
    return tuple(Run.make(r.full, r.full_stride, r.local + offset, r.local_stride, r.length, r.count) for r in runs)


@dataclass(frozen=True)
class Layout:
    model: ModelSpec
    mesh: DeviceMesh
    strategy: Strategy
    fused: bool = False
    placement: tuple[int, ...] | None = None  # global rank at each strategy index (default: mesh order)
    _cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.strategy.zero3:
            if self.mesh.size % self.strategy.dp:
                raise ConfigError(f"zero3:d{self.strategy.dp} does not divide the mesh {self.mesh}")
        elif self.strategy.size != self.mesh.size:
            raise ConfigError(f"strategy {self.strategy} needs {self.strategy.size} ranks, mesh {self.mesh} has "
                              f"{self.mesh.size}")
        if self.strategy.ep > 1 and not any(p.experts for p in self.model.params):
            raise ConfigError(f"strategy {self.strategy}: expert parallelism (e{self.strategy.ep}) needs a "
                              f"mixture-of-experts model; {self.model.family} has no experts")
        if self.placement is not None and sorted(self.placement) != sorted(self.mesh.ranks):
            raise ConfigError("a layout placement must be a permutation of its mesh")

    # -- ranks and coordinates -------------------------------------------------------------------

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.placement or self.mesh.ranks

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp_rank, tp_rank, pp_rank) of a global rank (zero3: (partition, 0, 0))."""
        index = self.ranks.index(rank)
        if self.strategy.zero3:
            return index % self.strategy.dp, 0, 0
        return self.strategy.coords(index)

    def key(self, rank: int) -> tuple:
        """Ranks with equal keys hold identical buffers (replicas)."""
        dp, tp, pp = self.coords(rank)
        return ("zero3", dp) if self.strategy.zero3 else self.shard_key(dp, tp, pp)

    def shard_key(self, dp: int, tp: int, pp: int) -> tuple:
        """The key of the shard held at coordinates (dp, tp, pp): (pp, tp), plus the ep rank with experts split."""
        return (pp, tp) if self.strategy.ep == 1 else (pp, tp, dp % self.strategy.ep)

    def key_ranks(self) -> dict[tuple, tuple[int, ...]]:
        if "key_ranks" not in self._cache:
            groups: dict[tuple, list[int]] = {}
            for rank in self.ranks:
                groups.setdefault(self.key(rank), []).append(rank)
            self._cache["key_ranks"] = {k: tuple(v) for k, v in groups.items()}
        return self._cache["key_ranks"]

    @property
    def stage_starts(self) -> list[int]:
        if "stages" not in self._cache:
            self._cache["stages"] = balanced_stages(self.model.unit_numel(), self.strategy.pp)
        return self._cache["stages"]

    def stage_units(self, pp_rank: int) -> range:
        starts = self.stage_starts + [self.model.num_units]
        return range(starts[pp_rank], starts[pp_rank + 1])

    # -- buffers ---------------------------------------------------------------------------------

    def buffers(self, rank: int) -> tuple[BufferSpec, ...]:
        """The buffers `rank` holds, in unit order."""
        return self.buffers_of_key(self.key(rank))

    def buffers_of_key(self, key: tuple) -> tuple[BufferSpec, ...]:
        cache = self._cache.setdefault("buffers", {})
        if key not in cache:
            cache[key] = self._zero3_buffers(key[1]) if key[0] == "zero3" else self._tp_buffers(*key)
        return cache[key]

    def _zero3_buffers(self, partition: int) -> tuple[BufferSpec, ...]:
        buffers = []
        for p in self.model.params:
            size = -(-p.numel // self.strategy.dp)
            start = partition * size
            valid = min(size, p.numel - start)
            runs = (Run.make(start, valid, 0, valid, valid, 1),) if valid > 0 else ()
            buffers.append(BufferSpec(p.name, (size,), (Member(p.name, runs),), p.unit))
        return tuple(buffers)

    def _shard(self, p: ParamInfo, tp_rank: int, ep_rank: int = 0) -> tuple[tuple[int, ...], tuple[Run, ...]]:
        ep = self.strategy.ep
        if not p.experts or ep == 1:
            return p.rule.shard(p.shape, self.strategy.tp, tp_rank, p.name)
        experts = p.shape[0]
        if experts % ep:
            raise ConfigError(f"expert parallelism e{ep} does not divide the {experts} experts of {p.name}")
        block = (experts // ep,) + p.shape[1:]  # this ep rank's experts: a contiguous block of the flattening
        shape, runs = p.rule.shard(block, self.strategy.tp, tp_rank, p.name)
        offset = ep_rank * math.prod(block)
        return shape, tuple(r._replace(full=r.full + offset) for r in runs)

    def _tp_buffers(self, pp_rank: int, tp_rank: int, ep_rank: int = 0) -> tuple[BufferSpec, ...]:
        units = self.stage_units(pp_rank)
        buffers: list[BufferSpec] = []
        fused: dict[str, list[tuple[int, tuple[int, ...], ParamInfo, tuple[Run, ...]]]] = {}
        for p in self.model.params:
            if p.unit not in units:
                continue
            shape, runs = self._shard(p, tp_rank, ep_rank)
            target = _fused_name(p.name) if self.fused and self.model.family != "gpt2" else None
            if target is None:
                buffers.append(BufferSpec(p.name, shape, (Member(p.name, runs),), p.unit))
            else:
                fused.setdefault(target[0], []).append((target[1], shape, p, runs))
        for name, parts in fused.items():
            parts.sort(key=lambda part: part[0])
            members, offset, rows = [], 0, 0
            for _, shape, p, runs in parts:
                members.append(Member(p.name, _shifted(runs, offset)))
                offset += math.prod(shape)
                rows += shape[0]
            buffers.append(BufferSpec(name, (rows,) + parts[0][1][1:], tuple(members), parts[0][2].unit))
        tied = self.model.tied_head
        last = self.model.num_units - 1
        if tied and last in units and 0 not in units:
            embedding = self.model.param(tied[1])
            shape, runs = self._shard(embedding, tp_rank)
            buffers.append(BufferSpec(tied[0], shape, (Member(embedding.name, runs),), last))
        buffers.sort(key=lambda b: b.unit)  # stable: parameter order within a unit
        return tuple(buffers)

    # -- who holds what ----------------------------------------------------------------------------

    def regions(self, param: str) -> tuple[Region, ...]:
        """The disjoint regions of `param` this layout holds, each with the ranks holding it, by `lo`."""
        if "regions" not in self._cache:
            found: dict[str, dict[tuple, dict[tuple, list[int]]]] = {}
            for key, ranks in self.key_ranks().items():
                for buffer in self.buffers_of_key(key):
                    for member in buffer.members:
                        if not member.runs:
                            continue
                        coverage = tuple((r.full, r.full_stride, r.length, r.count) for r in member.runs)
                        holdings = found.setdefault(member.param, {}).setdefault(coverage, {})
                        holdings.setdefault((buffer.name, member.runs), []).extend(ranks)
            self._cache["regions"] = {
                name: tuple(sorted((Region(coverage, tuple(Holding(buf, runs, tuple(sorted(rs)))
                                                           for (buf, runs), rs in holdings.items()),
                                           min(c[0] for c in coverage),
                                           max(c[0] + (c[3] - 1) * c[1] + c[2] for c in coverage))
                                    for coverage, holdings in by_coverage.items()), key=lambda r: r.lo))
                for name, by_coverage in found.items()}
        return self._cache["regions"].get(param, ())

    def regions_meeting(self, param: str, lo: int, hi: int) -> tuple[Region, ...]:
        """The regions of `param` whose [lo, hi) bounds meet [lo, hi) (bisect on sorted bounds)."""
        index = self._cache.setdefault("region_index", {})
        if param not in index:
            regions = self.regions(param)
            los, his = [r.lo for r in regions], [r.hi for r in regions]
            back_to_back = all(a <= b for a, b in zip(his, los[1:]))  # then his are sorted too
            index[param] = (regions, los, his, back_to_back)
        regions, los, his, back_to_back = index[param]
        end = bisect.bisect_left(los, hi)
        if back_to_back:
            return regions[bisect.bisect_right(his, lo):end]
        return tuple(r for r in regions[:end] if r.hi > lo)

    def with_placement(self, placement: tuple[int, ...]) -> "Layout":
        return Layout(self.model, self.mesh, self.strategy, self.fused, placement)

    def expert_ranks(self, rank: int) -> tuple[int, ...]:
        """The global ranks of `rank`'s expert-parallel group, in ep-rank order (itself alone when ep = 1)."""
        dp, tp, pp = self.coords(rank)
        return tuple(self.ranks[self.strategy.index(d, tp, pp)] for d in self.strategy.expert_group(dp))

    def tensor_ranks(self, rank: int) -> tuple[int, ...]:
        """The global ranks of `rank`'s tensor-parallel group, in tp-rank order."""
        dp, _, pp = self.coords(rank)
        return tuple(self.ranks[self.strategy.index(dp, t, pp)] for t in range(self.strategy.tp))

    def __str__(self) -> str:
        return f"{self.strategy}@[{self.mesh}]"

