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
from ds_realloc.utils.logging import get_logger
from ds_realloc.utils.memory import memory_stats

logger = get_logger(__name__)


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


class StepMetrics:
    """A step's values from what its MFCs reported: reduced over ranks, plus every engine's learning
    rate and gradient norm, tokens per second per role, memory, and the slowest rank's timings; the
    time of every MFC is kept for the summary's means."""

    def __init__(self):
        self.mfc_seconds: dict[str, list[float]] = {}

    def values(self, metrics: Metrics, timings: dict[str, float], step_s: float, engines: dict) -> dict[str, float]:
        """`engines`: role name -> the role's training engine on this rank."""
        values = reduce_metrics(metrics)
        extra = {**timings, **memory_stats(), "time/step_s": step_s}
        for role, engine in engines.items():
            extra[f"{role}/lr"] = float(engine.get_lr()[0])
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                extra[f"{role}/grad_norm"] = float(grad_norm)
        values.update(reduce_max(extra))
        for name in [n for n in values if n.endswith("/tokens")]:
            values[f"{name}_per_s"] = values.pop(name) / values["time/step_s"]
        for name, seconds in values.items():
            if name.startswith("time/") and name != "time/step_s":
                self.mfc_seconds.setdefault(name.removeprefix("time/").removesuffix("_s"), []).append(seconds)
        return values

    def mean_seconds(self) -> dict[str, float]:
        return {name: sum(t) / len(t) for name, t in self.mfc_seconds.items()}


class StepTable:
    """One line per step on rank 0: the experiment's headline metrics and the time of every MFC."""

    def __init__(self, columns: tuple[tuple[str, str], ...], enabled: bool):
        self.columns, self.enabled, self.header_done = columns, enabled, False

    def row(self, step: int, total: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        times = sorted(k for k in values if k.startswith("time/") and k != "time/step_s")
        if not self.header_done:
            names = ["step", *(label for label, _ in self.columns), *(t[5:-2] + "_s" for t in times), "step_s"]
            logger.info(" | ".join(f"{n:>12}" for n in names))
            self.header_done = True
        cells = [f"{step}/{total}", *(_cell(values.get(key)) for _, key in self.columns),
                 *(_cell(values[t]) for t in times), _cell(values["time/step_s"])]
        logger.info(" | ".join(f"{c:>12}" for c in cells))


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_values(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
