"""Per-step metrics: reduced exactly across ranks, written by rank 0 to metrics.jsonl and tensorboard.

Ranks may hold different metric names (MFCs on disjoint meshes), so every reduction first agrees
on the union of names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

from ds_realloc.algorithms.interface import MAX, Metrics
from ds_realloc.utils.dist import comm_device


def _union(names: dict[str, bool], group=None) -> dict[str, bool]:
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, names, group=group)
    merged: dict[str, bool] = {}
    for part in gathered:
        merged.update(part)
    return dict(sorted(merged.items()))


def reduce_metrics(metrics: Metrics, group=None) -> dict[str, float]:
    """Global values of (sum, count) metrics: sum/count over all ranks, the plain sum when count is
    None, the largest value when it is MAX."""
    largest = reduce_max({name: value for name, (value, count) in metrics.items() if count == MAX}, group)
    metrics = {name: value for name, value in metrics.items() if value[1] != MAX}
    kinds = _union({name: count is None for name, (_, count) in metrics.items()}, group)
    if not kinds:
        return largest
    rows = [[metrics.get(name, (0.0, 0.0))[0], 0.0 if is_sum else metrics.get(name, (0.0, 0.0))[1]]
            for name, is_sum in kinds.items()]
    sums = torch.tensor(rows, dtype=torch.float64, device=comm_device())
    dist.all_reduce(sums, group=group)
    return {**largest, **{name: total if is_sum else total / max(count, 1e-12)
                          for (name, is_sum), (total, count) in zip(kinds.items(), sums.tolist())}}


def reduce_max(values: dict[str, float], group=None) -> dict[str, float]:
    """The largest value of each name over the ranks that have it (peaks, the slowest rank's times)."""
    names = list(_union({name: False for name in values}, group))
    if not names:
        return {}
    tensor = torch.tensor([values.get(n, -math.inf) for n in names], dtype=torch.float64, device=comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(names, tensor.tolist()))


class MetricsWriter:
    """Appends one JSON object per step to metrics.jsonl and mirrors every scalar to tensorboard."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._path = run_dir / "metrics.jsonl"
        self._jsonl = open(self._path, "a", encoding="utf-8")
        self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **values}, sort_keys=True) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()

    def truncate_after(self, step: int) -> None:
        """Drop the rows of steps after `step` (a resumed run logs them again), in metrics.jsonl and in
        tensorboard (a new event file whose purge step hides the older files' points after `step`)."""
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        lines = self._path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        self._path.write_text("".join(kept), encoding="utf-8")  # the appending handle goes on at the new end
        log_dir = self._tensorboard.log_dir
        self._tensorboard.close()
        self._tensorboard = SummaryWriter(log_dir=log_dir, purge_step=step + 1)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()
