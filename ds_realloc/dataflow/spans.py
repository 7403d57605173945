"""Measured timelines: every rank writes the start and end of each MFC's input move, reallocation and
call to its own file in the run folder (`timeline/rank<r>.jsonl`, one line per step).

Times are seconds on a clock aligned across ranks: each rank's zero is the moment it leaves a
barrier that every rank enters once start-up is done, so the ranks' zeros differ by the barrier's
release skew (the transport's latency, milliseconds), not by their clocks. `ds-realloc timeline`
draws these files beside the planner's prediction. Each line also carries the rank's memory right after
start-up and its peak since then (on GPU: within the step), which `bench planner` compares with the
planner's memory estimate.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch.distributed as dist

from ds_realloc.utils.memory import peak_memory, reset_peak_memory

MOVE, REALLOC, CALL = "move", "realloc", "call"  # the planner's operation kinds (planner/simulate.py)


def timeline_dir(run_dir: Path) -> Path:
    return run_dir / "timeline"


class SpanRecorder:
    """This rank's spans of the current step, flushed to its file at the end of each step."""

    def __init__(self, run_dir: Path | None, rank: int, meta: dict | None = None):
        """`run_dir` None: spans are kept for the step but written nowhere. A fresh run's folder has no
        timeline yet (`setup.prepare_run_dir`); a resumed one appends. Rank 0 writes `meta` (the command
        and world, for `ds-realloc timeline --plan`) to `timeline/run.json`."""
        self.rank, self.step, self.spans = rank, 0, []
        self.path = None if run_dir is None else timeline_dir(run_dir) / f"rank{rank}.jsonl"
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if rank == 0 and meta is not None:
                (self.path.parent / "run.json").write_text(json.dumps(meta) + "\n")
        dist.barrier()  # the aligned clock's zero: the moment every rank leaves the barrier
        self.zero = time.perf_counter()
        self.zero_unix = time.time()
        self.memory_start = reset_peak_memory()  # the level right after start-up

    def now(self) -> float:
        return time.perf_counter() - self.zero

    def add(self, mfc: str, kind: str, start: float, end: float) -> None:
        self.spans.append({"mfc": mfc, "kind": kind, "start": round(start, 6), "end": round(end, 6)})

    def begin_step(self, step: int) -> None:
        self.step, self.spans = step, []

    def end_step(self, start: float, end: float) -> None:
        if self.path is None:
            return
        line = {"step": self.step, "rank": self.rank, "start": round(start, 6), "end": round(end, 6),
                "zero_unix": self.zero_unix, "memory_start_bytes": self.memory_start,
                "memory_peak_bytes": peak_memory(), "spans": self.spans}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


def read_timeline(run_dir: Path) -> dict[int, list[dict]]:
    """step -> every rank's record of that step (rank order)."""
    folder = timeline_dir(run_dir)
    files = sorted(folder.glob("rank*.jsonl")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{folder}: no timeline files (rank<r>.jsonl); a run writes them at every step")
    steps: dict[int, dict[int, dict]] = {}
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON line: {e.msg}") from None
            steps.setdefault(record["step"], {})[record["rank"]] = record  # a resumed run's repeat replaces
    return {step: [records[r] for r in sorted(records)] for step, records in sorted(steps.items())}
