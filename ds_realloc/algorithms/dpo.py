"""Direct preference optimisation (sigmoid loss) against a frozen reference model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_realloc.algorithms.functional import dpo_loss, sequence_logprobs
from ds_realloc.algorithms.geometry import micro_slices
from ds_realloc.algorithms.interface import (Batch, InferenceInterface, Metrics, TrainInterface, add_metric,
                                             add_pair_metrics, padded_pairs, train_micro_batches)


@dataclass(frozen=True)
class DPOInterface(TrainInterface, InferenceInterface):
    """`inference` gives the reference log-probs of `batch["pair"]`; `train_step` trains the policy."""

    micro_batch_size: int
    pad_id: int
    beta: float

    def _logps(self, model, pairs) -> tuple[torch.Tensor, torch.Tensor, float]:
        t = padded_pairs(pairs, self.pad_id, model.device)
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        chosen, rejected = sequence_logprobs(logits, t["input_ids"], t["loss_mask"]).chunk(2)
        return chosen, rejected, float(t["attention_mask"].sum())

    @torch.no_grad()
    def inference(self, call, batch: Batch) -> Batch:
        """Reference log-probs of every pair, from the reference model on this MFC's layout."""
        chosen, rejected = [], []
        for rows in micro_slices(len(batch["pair"]), self.micro_batch_size):
            t = padded_pairs(batch["pair"][rows], self.pad_id, torch.device("cpu"))
            logprobs = call.logprobs(t["input_ids"], t["attention_mask"]).float().cpu()
            sums = (logprobs * t["loss_mask"][:, 1:]).sum(-1)
            c, r = sums.chunk(2)
            chosen += c.tolist()
            rejected += r.tolist()
        return {"ref_chosen_logp": chosen, "ref_rejected_logp": rejected}

    def _pair_metrics(self, model, batch: Batch, rows: slice, weight: torch.Tensor | None, metrics: Metrics):
        """DPO losses of the pairs in `rows`, with their metrics added (implicit rewards, accuracy, margin)."""
        chosen, rejected, tokens = self._logps(model, batch["pair"][rows])
        ref_chosen = torch.tensor(batch["ref_chosen_logp"][rows], device=chosen.device)
        ref_rejected = torch.tensor(batch["ref_rejected_logp"][rows], device=chosen.device)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        weight = torch.ones_like(losses) if weight is None else weight.to(losses.device, losses.dtype)
        add_pair_metrics(metrics, losses, chosen_rewards, rejected_rewards, weight, prefix="reward_")
        n = float(weight.sum())
        add_metric(metrics, "chosen_reward", float((chosen_rewards * weight).sum()), n)
        add_metric(metrics, "rejected_reward", float((rejected_rewards * weight).sum()), n)
        return losses, tokens

    def train_step(self, engine, batch: Batch) -> Metrics:
        def loss_of(rows: slice, metrics: Metrics):
            losses, tokens = self._pair_metrics(engine, batch, rows, None, metrics)
            return losses.sum(), tokens

        return train_micro_batches(engine, len(batch["pair"]), self.micro_batch_size, loss_of,
                                   lambda rows: len(batch["pair"][rows]))  # the mean over the step's pairs

    @torch.no_grad()
    def evaluate(self, model, batch: Batch) -> Metrics:
        metrics: Metrics = {}
        for rows in micro_slices(len(batch["pair"]), self.micro_batch_size):
            self._pair_metrics(model, batch, rows, torch.tensor(batch["valid"][rows]), metrics)
        return metrics
