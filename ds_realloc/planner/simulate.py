"""Playing a step through the cost model with the runner's own semantics.

The runner (dataflow/walk.py) walks the MFC graph in waves: a wave is every MFC whose inputs
exist; all of a wave's input moves happen first, then, MFC by MFC, the role's weights are placed
into the call's layout and the call runs on its mesh. Nothing is scheduled centrally: an operation
starts when every rank taking part in it is free, so calls on disjoint meshes overlap. `play` is
exactly that rule over per-rank clocks; `step_ops` lists a step's operations in the runner's order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ds_realloc.dataflow.mfc import MFC, dataset_keys

MOVE, REALLOC, CALL = "move", "realloc", "call"


@dataclass(frozen=True)
class Op:
    """One operation of a step: an MFC's input move, its weights' reallocation or the call itself."""

    mfc: str
    kind: str  # MOVE, REALLOC or CALL
    ranks: tuple[int, ...]  # the ranks taking part (each waits for all of them)
    seconds: float

    @property
    def name(self) -> str:
        return self.mfc if self.kind == CALL else f"{self.kind}:{self.mfc}"


@dataclass(frozen=True)
class Span:
    name: str
    mfc: str
    kind: str
    rank: int
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    spans: tuple[Span, ...]
    world: int
    makespan: float
    busy: tuple[float, ...] = field(default=())  # seconds each rank spends in operations

    def of_mfc(self, mfc: str, kind: str = CALL) -> tuple[float, float]:
        """(earliest start, latest end) of an MFC's operations of `kind` over its ranks."""
        mine = [s for s in self.spans if s.mfc == mfc and s.kind == kind]
        if not mine:
            raise KeyError(f"no {kind} operation of {mfc} in the timeline")
        return min(s.start for s in mine), max(s.end for s in mine)


def play(ops: Sequence[Op], world: int) -> Timeline:
    """Run `ops` in order: each starts when the last of its ranks is free and holds all of them until it ends."""
    clocks = [0.0] * world
    busy = [0.0] * world
    spans = []
    for op in ops:
        if not op.ranks:
            continue
        start = max(clocks[r] for r in op.ranks)
        end = start + op.seconds
        for r in op.ranks:
            clocks[r] = end
            busy[r] += op.seconds
            spans.append(Span(op.name, op.mfc, op.kind, r, start, end))
    return Timeline(tuple(spans), world, max(clocks, default=0.0), tuple(busy))


def waves(mfcs: Sequence[MFC]) -> list[list[MFC]]:
    """The runner's waves: every MFC whose inputs exist, in the given order, then the next."""
    available = set(dataset_keys(mfcs))
    pending, out = list(mfcs), []
    while pending:
        wave = [m for m in pending if set(m.input_keys) <= available]
        if not wave:
            raise ValueError(f"MFCs {[m.name for m in pending]} wait for keys nothing writes")
        out.append(wave)
        available |= {key for m in wave for key in m.output_keys}
        pending = [m for m in pending if m not in wave]
    return out


def step_ops(mfcs: Sequence[MFC], calls: Mapping[str, Op], reallocs: Mapping[str, Op],
             moves: Mapping[str, Sequence[Op]]) -> list[Op]:
    """A step's operations in the order the runner issues them: per wave the input moves of each MFC,
    then for each MFC its reallocation (if any) and its call."""
    ops: list[Op] = []
    for wave in waves(mfcs):
        for mfc in wave:
            ops.extend(moves.get(mfc.name, ()))
        for mfc in wave:
            if mfc.name in reallocs:
                ops.append(reallocs[mfc.name])
            ops.append(calls[mfc.name])
    return ops
