"""Reallocation plans: which rank sends which strided pieces of which parameter to whom.

`ReallocPlan.build(model, src_layout, dst_layout)` is a pure function of its arguments, so every
rank computes the same plan locally and no metadata is exchanged. It

1. intersects, for every distinct destination shard (tp rank x pp stage, or ZeRO-3 partition),
   each buffer member with the source regions of its parameter -> `Need`s, each with the replica
   ranks that could serve it (shared by all destination replicas of the shard);
2. places the tensor-parallel ranks of every destination group on the group's global ranks so
   that the most elements are already local (a maximum-weight assignment per group);
3. picks, per destination rank and need, the destination rank itself when it holds the region,
   else the least-loaded holder (ties: lowest rank).

Received elements therefore equal the lower bound (`lower_bound`: computed from the two layouts
alone, the least each destination rank must receive over every placement of its tensor-parallel
group), which `stats()` reports beside the plan's own traffic.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

from ds_realloc.layout.layout import BufferSpec, Layout
from ds_realloc.layout.model import ModelSpec
from ds_realloc.layout.runs import Piece, intersect
from ds_realloc.utils.errors import ConfigError


class Transfer(NamedTuple):
    """Strided copies of one parameter's elements from a source buffer into a destination buffer."""

    param: str
    unit: int
    src_buffer: str
    dst_buffer: str
    pieces: tuple[Piece, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.pieces)


class Need(NamedTuple):
    """Elements of one destination buffer that one source region provides; `options` are the
    (holder rank, transfer index) pairs that can serve it, sorted by rank."""

    unit: int
    numel: int
    options: tuple[tuple[int, int], ...]

    def held_by(self, rank: int) -> bool:
        return any(option[0] == rank for option in self.options)


@dataclass(frozen=True)
class PlanStats:
    """Traffic of a plan, in elements (multiply by the element size for bytes)."""

    recv: dict[int, int]
    send: dict[int, int]
    lower_bound: dict[int, int]
    local: dict[int, int]
    messages: int
    bucket: dict[int, int] = field(default_factory=dict)  # per rank: the most one unit sends + receives

    @property
    def busiest(self) -> tuple[int, int]:
        """(rank, elements sent + received) of the rank with the most traffic."""
        ranks = set(self.recv) | set(self.send)
        return max(((r, self.recv.get(r, 0) + self.send.get(r, 0)) for r in ranks), key=lambda x: (x[1], -x[0]),
                   default=(-1, 0))

    def as_dict(self, element_bytes: int = 1) -> dict:
        rank, traffic = self.busiest
        return {
            "recv_bytes_per_rank": {r: v * element_bytes for r, v in sorted(self.recv.items())},
            "send_bytes_per_rank": {r: v * element_bytes for r, v in sorted(self.send.items())},
            "lower_bound_bytes_per_rank": {r: v * element_bytes for r, v in sorted(self.lower_bound.items())},
            "local_bytes_per_rank": {r: v * element_bytes for r, v in sorted(self.local.items())},
            "total_recv_bytes": sum(self.recv.values()) * element_bytes,
            "total_lower_bound_bytes": sum(self.lower_bound.values()) * element_bytes,
            "busiest_rank": rank,
            "busiest_rank_bytes": traffic * element_bytes,
            "messages": self.messages,
        }


@dataclass
class Bucket:
    """One pipeline unit's share of a rank's work: local copies, and pieces to receive / send per peer."""

    unit: int
    buffers: list[BufferSpec] = field(default_factory=list)  # destination buffers of this unit
    local: list[Transfer] = field(default_factory=list)
    recv: dict[int, list[Transfer]] = field(default_factory=dict)
    send: dict[int, list[Transfer]] = field(default_factory=dict)


def max_weight_assignment(weights: list[list[int]]) -> list[int]:
    """assignment[i] = column of row i maximising the total weight (Hungarian algorithm, O(n^3));
    the identity wins ties."""
    n = len(weights)
    if n <= 1:
        return list(range(n))
    cost = [[-w for w in row] for row in weights]
    INF = float("inf")
    u, v, p, way = [0.0] * (n + 1), [0.0] * (n + 1), [0] * (n + 1), [0] * (n + 1)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv, used = [INF] * (n + 1), [False] * (n + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], INF, 0
            for j in range(1, n + 1):
                if not used[j]:
                    current = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if current < minv[j]:
                        minv[j], way[j] = current, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(n + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    assignment = [0] * n
    for j in range(1, n + 1):
        assignment[p[j] - 1] = j - 1
    identity = sum(weights[i][i] for i in range(n))
    best = sum(weights[i][assignment[i]] for i in range(n))
    return list(range(n)) if best <= identity else assignment


class ReallocPlan:
    """A plan from `src` to `dst` (see the module docstring); build with `ReallocPlan.build`."""

    def __init__(self, model: ModelSpec, src: Layout, dst: Layout, needs: dict[tuple, tuple[Need, ...]],
                 transfers: dict[tuple, tuple[Transfer, ...]]):
        self.model, self.src, self.dst = model, src, dst
        self.needs, self.transfers = needs, transfers
        self._choices: dict[tuple[int, tuple, int], tuple[int, int]] = {}
        self._programs: dict[int, list[Bucket]] = {}
        self._route()

    # -- building ----------------------------------------------------------------------------------

    @classmethod
    def build(cls, model: ModelSpec, src: Layout, dst: Layout, place: bool = True) -> "ReallocPlan":
        """The plan moving `model` from `src` to `dst`; with `place` (and no placement given), the
        destination's tensor-parallel ranks are placed to maximise local elements."""
        if src.model != model or dst.model != model:
            raise ConfigError("source and destination layouts are of different models")
        needs: dict[tuple, tuple[Need, ...]] = {}
        transfers: dict[tuple, tuple[Transfer, ...]] = {}
        for key in dst.key_ranks():
            needs[key], transfers[key] = _needs_of(dst.buffers_of_key(key), src)
        if place and dst.placement is None and not dst.strategy.zero3 and dst.strategy.tp > 1:
            dst = dst.with_placement(_placement(dst, needs))
        return cls(model, src, dst, needs, transfers)

    def _route(self) -> None:
        """Choose a holder for every multi-holder need of every destination rank (load-balanced)."""
        load: dict[int, int] = defaultdict(int)
        key_ranks = self.dst.key_ranks()
        for key, ranks in key_ranks.items():
            rank_set = set(ranks)
            for need in self.needs[key]:
                if len(need.options) == 1:
                    holder = need.options[0][0]
                    load[holder] += need.numel * (len(ranks) - (holder in rank_set))
        for key in sorted(key_ranks):
            for index, need in enumerate(self.needs[key]):
                if len(need.options) == 1:
                    continue
                for d in key_ranks[key]:
                    local = [option for option in need.options if option[0] == d]
                    if local:
                        choice = local[0]
                    else:
                        choice = min(need.options, key=lambda option: (load[option[0]], option[0]))
                        load[choice[0]] += need.numel
                    self._choices[(d, key, index)] = choice

    def choice(self, rank: int, key: tuple, index: int) -> tuple[int, int]:
        """(source rank, transfer index) serving need `index` of destination rank `rank` (of shard `key`)."""
        need = self.needs[key][index]
        return need.options[0] if len(need.options) == 1 else self._choices[(rank, key, index)]

    # -- statistics --------------------------------------------------------------------------------

    def stats(self) -> PlanStats:
        recv, send, local = defaultdict(int), defaultdict(int), defaultdict(int)
        moved = defaultdict(int)  # (rank, unit) -> elements sent + received: one bucket's buffers
        pairs: set[tuple[int, int]] = set()
        for key, ranks in self.dst.key_ranks().items():
            single_total, single_held = 0, defaultdict(int)
            for index, need in enumerate(self.needs[key]):
                if len(need.options) == 1:
                    holder = need.options[0][0]
                    single_total += need.numel
                    single_held[holder] += need.numel
                    for d in ranks:
                        if d != holder:
                            moved[(d, need.unit)] += need.numel
                            moved[(holder, need.unit)] += need.numel
                    continue
                for d in ranks:
                    src = self._choices[(d, key, index)][0]
                    if src == d:
                        local[d] += need.numel
                    else:
                        recv[d] += need.numel
                        send[src] += need.numel
                        moved[(d, need.unit)] += need.numel
                        moved[(src, need.unit)] += need.numel
                        pairs.add((src, d))
            for d in ranks:
                mine = single_held.get(d, 0)
                recv[d] += single_total - mine
                local[d] += mine
            for holder, numel in single_held.items():
                receivers = [d for d in ranks if d != holder]
                send[holder] += numel * len(receivers)
                pairs.update((holder, d) for d in receivers)
        bucket: dict[int, int] = defaultdict(int)
        for (rank, _), numel in moved.items():
            bucket[rank] = max(bucket[rank], numel)
        return PlanStats(dict(recv), dict(send), lower_bound(self.src, self.dst, self.needs), dict(local),
                         len(pairs), dict(bucket))

    # -- execution programs ------------------------------------------------------------------------

    def program(self, rank: int) -> list[Bucket]:
        """What `rank` does, bucket by bucket (pipeline units in order). Sender and receiver list the
        transfers of a (peer, unit) pair in the same order, so buffers need no headers."""
        if rank in self._programs:
            return self._programs[rank]
        buckets: dict[int, Bucket] = {}

        def bucket(unit: int) -> Bucket:
            return buckets.setdefault(unit, Bucket(unit))

        key_ranks = self.dst.key_ranks()
        if rank in self.dst.ranks:
            key = self.dst.key(rank)
            for buffer in self.dst.buffers_of_key(key):
                bucket(buffer.unit).buffers.append(buffer)
            for index, need in enumerate(self.needs[key]):
                src, t = self.choice(rank, key, index)
                transfer = self.transfers[key][t]
                if src == rank:
                    bucket(need.unit).local.append(transfer)
                else:
                    bucket(need.unit).recv.setdefault(src, []).append(transfer)
        for key, ranks in key_ranks.items():
            for index, need in enumerate(self.needs[key]):
                if not need.held_by(rank):
                    continue
                for d in ranks:
                    src, t = self.choice(d, key, index)
                    if src == rank and d != rank:
                        bucket(need.unit).send.setdefault(d, []).append(self.transfers[key][t])
        self._programs[rank] = [buckets[unit] for unit in sorted(buckets)]
        return self._programs[rank]


def _needs_of(buffers: tuple[BufferSpec, ...], src: Layout) -> tuple[tuple[Need, ...], tuple[Transfer, ...]]:
    """The needs of one destination shard, and the transfers their options refer to."""
    needs: list[Need] = []
    transfers: list[Transfer] = []
    for buffer in buffers:
        for member in buffer.members:
            if not member.runs:
                continue
            if not src.regions(member.param):
                raise ConfigError(f"the source layout {src} does not hold parameter '{member.param}'")
            lo, hi = min(r.full for r in member.runs), max(r.full_end for r in member.runs)
            for region in src.regions_meeting(member.param, lo, hi):
                options: list[tuple[int, int]] = []
                numel = 0
                for holding in region.holdings:
                    if len(holding.runs) == 1 and len(member.runs) == 1:  # fast path: one run each
                        pieces = intersect(holding.runs[0], member.runs[0])
                    else:
                        pieces = [piece for s in holding.runs for d in member.runs for piece in intersect(s, d)]
                    if not pieces:
                        break  # holdings of a region cover the same elements
                    numel = sum(piece.length * piece.count for piece in pieces)
                    transfers.append(Transfer(member.param, buffer.unit, holding.buffer, buffer.name, tuple(pieces)))
                    index = len(transfers) - 1
                    options += [(rank, index) for rank in holding.ranks]
                if options:
                    options.sort()
                    needs.append(Need(buffer.unit, numel, tuple(options)))
    return tuple(needs), tuple(transfers)


def _placement(dst: Layout, needs: dict[tuple, tuple[Need, ...]]) -> tuple[int, ...]:
    """Global rank per strategy index: within every tensor-parallel group, tp ranks go to the global
    ranks that already hold the most of their shards."""
    held: dict[tuple, dict[int, int]] = {}
    for key, key_needs in needs.items():
        counts: dict[int, int] = defaultdict(int)
        for need in key_needs:
            for rank, _ in need.options:
                counts[rank] += need.numel
        held[key] = counts
    strategy = dst.strategy
    placement = list(dst.mesh.ranks)
    for pp, dp in itertools.product(range(strategy.pp), range(strategy.dp)):
        indices = [strategy.index(dp, tp, pp) for tp in range(strategy.tp)]
        group = [dst.mesh.ranks[i] for i in indices]
        weights = [[held[dst.shard_key(dp, tp, pp)].get(rank, 0) for tp in range(strategy.tp)] for rank in group]
        assignment = max_weight_assignment(weights)
        for rank, tp in zip(group, assignment):
            placement[indices[tp]] = rank
    return tuple(placement)


def _best_assignment(held: list[list[int]]) -> list[int]:
    """column (tp rank) of each row (global rank) maximising the elements held: by enumeration for
    up to 6 ranks, else by the Hungarian algorithm (both exact)."""
    n = len(held)
    if n > 6:
        return max_weight_assignment(held)
    return list(max(itertools.permutations(range(n)), key=lambda perm: sum(held[i][perm[i]] for i in range(n))))


def lower_bound(src: Layout, dst: Layout, needs: dict[tuple, tuple[Need, ...]] | None = None) -> dict[int, int]:
    """The least each destination rank must receive, in elements, from the two layouts alone: per
    destination shard, what a rank needs and does not already hold, minimised over the one freedom
    that changes it - which global rank of each tensor-parallel group plays which tp rank (which
    replica sends changes who sends, not what is received). Independent of any plan's placement;
    `needs` (per destination shard, which depend on the layouts alone) saves recomputing them."""
    totals: dict[tuple, int] = {}
    held: dict[tuple, dict[int, int]] = {}
    for key in dst.key_ranks():
        counts: dict[int, int] = defaultdict(int)
        total = 0
        for need in (needs[key] if needs is not None else _needs_of(dst.buffers_of_key(key), src)[0]):
            total += need.numel
            for rank in {option[0] for option in need.options}:
                counts[rank] += need.numel
        totals[key], held[key] = total, counts
    bound: dict[int, int] = {}
    strategy = dst.strategy
    if strategy.zero3 or strategy.tp == 1:  # no freedom: a rank's shard is fixed by its position
        for key, ranks in dst.key_ranks().items():
            for rank in ranks:
                bound[rank] = totals[key] - held[key].get(rank, 0)
        return bound
    for pp, dp in itertools.product(range(strategy.pp), range(strategy.dp)):
        group = [dst.mesh.ranks[strategy.index(dp, tp, pp)] for tp in range(strategy.tp)]
        weights = [[held[dst.shard_key(dp, tp, pp)].get(rank, 0) for tp in range(strategy.tp)] for rank in group]
        for rank, tp in zip(group, _best_assignment(weights)):
            bound[rank] = totals[dst.shard_key(dp, tp, pp)] - weights[group.index(rank)][tp]
    return bound
