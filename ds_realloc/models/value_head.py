"""Critic and reward models: an HF `*ForSequenceClassification` (num_labels=1) read per token.

The wrapped model keeps HF's parameter names (`model.layers...`, `score.weight`), so a saved
critic or reward model loads with `AutoModelForSequenceClassification.from_pretrained(path)`.
"""

from __future__ import annotations

import torch
from torch import nn


class ScalarHeadModel(nn.Module):
    """Backbone + `score` head of an HF sequence classifier, returning one value per token [B, T]."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    @property
    def config(self):
        return self.hf.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        backbone = getattr(self.hf, self.hf.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        return self.hf.score(hidden).squeeze(-1).float()


def last_token_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The value at each row's last attended token (right padding): the sequence's reward score."""
    last = attention_mask.sum(dim=1) - 1
    return values.gather(1, last.unsqueeze(1)).squeeze(1)


def hf_model_of(module: nn.Module) -> nn.Module:
    """The HF model inside a training or inference module (the module itself for language models)."""
    return module.hf if isinstance(module, ScalarHeadModel) else module
