"""Per-step metrics: reduced exactly across ranks, written by rank 0 to metrics.jsonl and tensorboard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

from ds_realloc.algorithms.interface import Metrics
from ds_realloc.utils.dist import comm_device


def reduce_metrics(metrics: Metrics, group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Global values of (sum, count) metrics: sum/count over all ranks, or the plain sum when count is None.
    Every rank of the group must pass the same keys."""
    names = sorted(metrics)
    if not names:
        return {}
    sums = torch.tensor([[metrics[n][0], metrics[n][1] if metrics[n][1] is not None else math.nan] for n in names],
                        dtype=torch.float64, device=comm_device())
    dist.all_reduce(sums, group=group)
    return {n: float(s) if math.isnan(c) else float(s) / max(float(c), 1e-12) for n, (s, c) in zip(names, sums.tolist())}


def reduce_max(values: dict[str, float], group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """The largest value of each key over the ranks (memory peaks, the slowest rank's times)."""
    names = sorted(values)
    if not names:
        return {}
    tensor = torch.tensor([values[n] for n in names], dtype=torch.float64, device=comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(names, tensor.tolist()))


class MetricsWriter:
    """Appends one JSON object per step to metrics.jsonl and mirrors every scalar to tensorboard."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **values}, sort_keys=True) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()
