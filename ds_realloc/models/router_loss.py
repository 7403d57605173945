"""The router's load-balancing loss of mixture-of-experts training.

HF's MoE language models (Mixtral, Qwen3-MoE) compute Switch Transformer's load-balancing loss of a
forward - E x sum_e (share of the top-k assignments routed to expert e) x (mean router probability of
e), over the non-padding tokens of every sparse layer - when called with `output_router_logits=True`,
and return it as `aux_loss`. `RouterLoss` asks for it on the forwards of a training step (and only
there: inference calls never pay for it) and hands each micro-batch's loss to the training loop,
which adds `coef` x that loss to the micro-batch's share (algorithms/interface.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ds_realloc.models.published import EXPERT_NAMES  # keyed by the MoE families


class RouterLoss:
    """Records the load-balancing loss of every forward of `model` (an HF MoE causal LM) while recording."""

    def __init__(self, model: nn.Module, coef: float):
        self.coef = coef
        self._recording = False
        self._losses: list[torch.Tensor] = []
        model.register_forward_pre_hook(self._ask, with_kwargs=True)
        model.register_forward_hook(self._keep)

    def _ask(self, module, args, kwargs):
        if self._recording:
            kwargs["output_router_logits"] = True
        return args, kwargs

    def _keep(self, module, args, output) -> None:
        if self._recording and getattr(output, "aux_loss", None) is not None:
            self._losses.append(output.aux_loss)

    @contextmanager
    def recording(self) -> Iterator[None]:
        self._recording, self._losses = True, []
        try:
            yield
        finally:
            self._recording, self._losses = False, []

    def take(self) -> torch.Tensor | None:
        """The mean loss of the forwards since the last call (None if there were none)."""
        losses, self._losses = self._losses, []
        return torch.stack(losses).mean() if losses else None


def router_loss_for(model: nn.Module, head: str, coef: float | None) -> RouterLoss | None:
    """A recorder for a trained language model with a router (`coef` None: the model config's
    `router_aux_loss_coef`), or None: a dense model, a scalar head (HF's MoE classifiers return no
    router loss) or a coefficient of 0."""
    if head != "lm" or model.config.model_type not in EXPERT_NAMES:
        return None
    coef = model.config.router_aux_loss_coef if coef is None else coef
    return RouterLoss(model, coef) if coef > 0 else None
