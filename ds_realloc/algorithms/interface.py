"""What an MFC does with its model: the types shared by all algorithm interfaces.

A batch is this rank's share of a step's samples: a dict of equally long per-sample lists (dataset
fields such as `seq` or `pair`, plus the outputs of earlier MFCs such as `ref_chosen_logp`). An
interface returns metrics as (sum, count) pairs so the runner can average exactly across ranks;
count None means "sum over ranks".
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from ds_realloc.algorithms.geometry import micro_slices
from ds_realloc.data.datasets import pad_sequences

Batch = dict[str, list]
MAX = "max"  # the count of a metric reduced by its largest value (over micro-batches, calls and ranks)
Metrics = dict[str, tuple[float, float | None | str]]


class Interface(Protocol):
    """What every MFC's interface has: state a checkpoint keeps (none unless it overrides these)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")


class TrainInterface(Interface, Protocol):
    def train_step(self, engine: Any, batch: Batch) -> Metrics:
        """Forward, backward and optimizer step(s) on the batch."""

    def evaluate(self, model: Any, batch: Batch) -> Metrics:
        """No-grad metrics on an eval batch (rows with batch["valid"] False are not counted)."""


class InferenceInterface(Interface, Protocol):
    def inference(self, model: Any, batch: Batch) -> Batch:
        """No-grad outputs per sample, merged into the batch for later MFCs."""


def add_metric(metrics: Metrics, name: str, total: float, count: float | None | str) -> None:
    """Accumulate a (sum, count) metric (count MAX: keep the largest value)."""
    if count == MAX:
        metrics[name] = (max(metrics[name][0], total) if name in metrics else total, MAX)
        return
    old_total, old_count = metrics.get(name, (0.0, 0.0 if count is not None else None))
    metrics[name] = (old_total + total, None if count is None else old_count + count)


def global_sum(value: float, group) -> float:
    """`value` summed over the ranks of `group` (no communication without one)."""
    if group is None:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total, group=group)
    return float(total.item())


def train_micro_batches(engine, batch_len: int, micro_batch_size: int,
                        loss_of: Callable[[slice, Metrics], tuple[torch.Tensor, float]],
                        units_of: Callable[[slice], float]) -> Metrics:
    """One optimizer step over a batch in micro-batches, with the loss aggregated exactly as named
    whatever the split. `loss_of(rows, metrics)` returns the rows' *summed* share of the loss (e.g.
    the sum of their token losses) and the tokens it processed; `units_of(rows)` what the aggregate
    divides by for those rows (their tokens, sequences or pairs). Every micro-batch backpropagates
    share x dp / units of the whole step on all data-parallel ranks: DeepSpeed averages gradients
    over its dp ranks, so the gradient is exactly that of sum(shares) / sum(units). The accumulation
    boundary is the batch's last micro-batch, whatever the engine's configured accumulation count
    (RAFT, PPO minibatches and evaluation padding train on fewer rows than a step's).

    A mixture-of-experts engine's router loss (`engine.router_loss`, models/router_loss.py) is
    aggregated the same way: each micro-batch adds coef x its router loss x its units to its share,
    so the step's loss gains coef x the units-weighted mean of the micro-batches' router losses
    (metric `router_aux_loss`, that mean)."""
    metrics: Metrics = {}
    slices = micro_slices(batch_len, micro_batch_size)
    per_slice = [float(units_of(rows)) for rows in slices]
    scale = engine.dp_world_size / max(global_sum(sum(per_slice), engine_group(engine)), 1e-12)
    router = getattr(engine, "router_loss", None)
    with router.recording() if router is not None else contextlib.nullcontext():
        for i, rows in enumerate(slices):
            engine.set_gradient_accumulation_boundary(i == len(slices) - 1)
            share, tokens = loss_of(rows, metrics)
            aux = router.take() if router is not None else None
            if aux is not None:
                share = share + router.coef * per_slice[i] * aux.to(share.device)
                add_metric(metrics, "router_aux_loss", aux.item() * per_slice[i], per_slice[i])
            engine.backward(share * scale, scale_wrt_gas=False)
            engine.step()
            add_metric(metrics, "tokens", tokens, None)
    return metrics


def engine_group(engine):
    """The data-parallel process group of a DeepSpeed engine (None when it is alone)."""
    return engine.data_parallel_group if engine.dp_world_size > 1 else None


def to_device(tensors: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def padded_pairs(pairs: list, pad_id: int, device) -> dict[str, torch.Tensor]:
    """One padded batch of preference pairs: the chosen sequences, then the rejected ones."""
    return to_device(pad_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id), device)


def add_pair_metrics(metrics: Metrics, losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
                     weight: torch.Tensor, prefix: str = "") -> None:
    """Loss, accuracy (chosen scored above rejected) and margin of preference pairs, weighted per pair
    (weight 0 for eval padding)."""
    weight = weight.to(chosen.dtype)
    n = float(weight.sum())
    add_metric(metrics, "loss", float((losses.detach() * weight).sum()), n)
    add_metric(metrics, f"{prefix}accuracy", float(((chosen > rejected).to(weight.dtype) * weight).sum()), n)
    add_metric(metrics, f"{prefix}margin", float(((chosen - rejected).detach() * weight).sum()), n)
