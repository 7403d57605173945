"""Supervised fine-tuning: token-level cross-entropy on answer tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_realloc.algorithms.functional import token_logprobs
from ds_realloc.algorithms.geometry import micro_slices
from ds_realloc.algorithms.interface import (Batch, Metrics, TrainInterface, add_metric, to_device, train_micro_batches)
from ds_realloc.data.datasets import pad_sequences


@dataclass(frozen=True)
class SFTInterface(TrainInterface):
    """Trains a language model on `batch["seq"]` (TokenizedSequence with answer masks)."""

    micro_batch_size: int
    pad_id: int

    def _forward(self, model, seqs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = to_device(pad_sequences(seqs, self.pad_id), model.device)
        return model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits, t

    def train_step(self, engine, batch: Batch) -> Metrics:
        """Token-mean cross-entropy over every answer token of the step, on all ranks."""

        def loss_of(rows: slice, metrics: Metrics):
            logits, t = self._forward(engine, batch["seq"][rows])
            nll = -(token_logprobs(logits, t["input_ids"]) * t["loss_mask"][:, 1:]).sum()
            add_metric(metrics, "loss", nll.item(), float(t["loss_mask"][:, 1:].sum()))
            return nll, float(t["attention_mask"].sum())

        return train_micro_batches(engine, len(batch["seq"]), self.micro_batch_size, loss_of,
                                   lambda rows: sum(sum(s.loss_mask[1:]) for s in batch["seq"][rows]))

    @torch.no_grad()
    def evaluate(self, model, batch: Batch) -> Metrics:
        """Exact token-mean loss over the answer tokens of the valid rows."""
        metrics: Metrics = {}
        for rows in micro_slices(len(batch["seq"]), self.micro_batch_size):
            logits, t = self._forward(model, batch["seq"][rows])
            valid = torch.tensor(batch["valid"][rows], device=logits.device).unsqueeze(1)
            mask = t["loss_mask"][:, 1:] * valid
            nll = -(token_logprobs(logits, t["input_ids"]) * mask).sum()
            add_metric(metrics, "loss", nll.item(), float(mask.sum()))
        return metrics
