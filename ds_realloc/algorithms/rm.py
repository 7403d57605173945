"""Reward modelling: Bradley-Terry pairwise loss on the score of each sequence's last token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_realloc.algorithms.functional import bradley_terry_loss
from ds_realloc.algorithms.geometry import micro_slices
from ds_realloc.algorithms.interface import (Batch, Metrics, TrainInterface, add_pair_metrics, padded_pairs,
                                             train_micro_batches)
from ds_realloc.models.value_head import last_token_scores


@dataclass(frozen=True)
class RewardModelInterface(TrainInterface):
    """Trains a scalar-head model so that chosen answers score above rejected ones (`batch["pair"]`)."""

    micro_batch_size: int
    pad_id: int

    def _scores(self, model, pairs) -> tuple[torch.Tensor, torch.Tensor, float]:
        t = padded_pairs(pairs, self.pad_id, model.device)
        scores = last_token_scores(model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]),
                                   t["attention_mask"])
        chosen, rejected = scores.chunk(2)
        return chosen, rejected, float(t["attention_mask"].sum())

    def train_step(self, engine, batch: Batch) -> Metrics:
        def loss_of(rows: slice, metrics: Metrics):
            chosen, rejected, tokens = self._scores(engine, batch["pair"][rows])
            losses = bradley_terry_loss(chosen, rejected)
            add_pair_metrics(metrics, losses, chosen, rejected, torch.ones_like(losses))
            return losses.sum(), tokens

        return train_micro_batches(engine, len(batch["pair"]), self.micro_batch_size, loss_of,
                                   lambda rows: len(batch["pair"][rows]))  # the mean over the step's pairs

    @torch.no_grad()
    def evaluate(self, model, batch: Batch) -> Metrics:
        """Pairwise accuracy, loss and score margin over the valid pairs."""
        metrics: Metrics = {}
        for rows in micro_slices(len(batch["pair"]), self.micro_batch_size):
            chosen, rejected, _ = self._scores(model, batch["pair"][rows])
            add_pair_metrics(metrics, bradley_terry_loss(chosen, rejected), chosen, rejected,
                             torch.tensor(batch["valid"][rows], device=chosen.device))
        return metrics
