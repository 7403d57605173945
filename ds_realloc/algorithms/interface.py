"""What an MFC does with its model: the types shared by all algorithm interfaces.

A batch is this rank's share of a step's samples: a dict of equally long per-sample lists (dataset
fields such as `seq` or `pair`, plus the outputs of earlier MFCs such as `ref_chosen_logp`). An
interface returns metrics as (sum, count) pairs so the runner can average exactly across ranks;
count None means "sum over ranks".
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from ds_realloc.data.datasets import pad_sequences

Batch = dict[str, list]
Metrics = dict[str, tuple[float, float | None]]


class TrainInterface(Protocol):
    def train_step(self, engine: Any, batch: Batch) -> Metrics:
        """Forward, backward and optimizer step(s) on the batch."""

    def evaluate(self, model: Any, batch: Batch) -> Metrics:
        """No-grad metrics on an eval batch (rows with batch["valid"] False are not counted)."""


class InferenceInterface(Protocol):
    def inference(self, model: Any, batch: Batch) -> Batch:
        """No-grad outputs per sample, merged into the batch for later MFCs."""


def micro_slices(batch_len: int, micro_batch_size: int) -> list[slice]:
    """Consecutive micro-batches of a batch."""
    return [slice(i, min(i + micro_batch_size, batch_len)) for i in range(0, batch_len, micro_batch_size)]


def add_metric(metrics: Metrics, name: str, total: float, count: float | None) -> None:
    """Accumulate a (sum, count) metric."""
    old_total, old_count = metrics.get(name, (0.0, 0.0 if count is not None else None))
    metrics[name] = (old_total + total, None if count is None else old_count + count)


def train_micro_batches(engine, batch_len: int, micro_batch_size: int,
                        loss_of: Callable[[slice, Metrics], tuple[torch.Tensor, float]]) -> Metrics:
    """One optimizer step over a batch in micro-batches: `loss_of(rows, metrics)` returns the loss of
    the rows (and adds its metrics) and the number of tokens it processed. The accumulation boundary
    is the batch's last micro-batch, whatever the engine's configured accumulation count (RAFT, PPO
    minibatches and evaluation padding train on fewer rows than a step's), and each micro-batch's
    loss counts 1 / (number of micro-batches)."""
    metrics: Metrics = {}
    slices = micro_slices(batch_len, micro_batch_size)
    for i, rows in enumerate(slices):
        engine.set_gradient_accumulation_boundary(i == len(slices) - 1)
        loss, tokens = loss_of(rows, metrics)
        engine.backward(loss / len(slices), scale_wrt_gas=False)
        engine.step()
        add_metric(metrics, "tokens", tokens, None)
    return metrics


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
