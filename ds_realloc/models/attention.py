"""Attention for the inference modules: a preallocated KV cache, masks, and SDPA.

Batches are left-padded for generation (every row's next token goes to the same cache slot) and
right-padded for scoring; both use positions = cumsum(valid) - 1. A padded query attends to itself
only, so no softmax row is empty (NaN-free), and no real query ever sees a padded key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of every layer for `capacity` positions, allocated once per generate call."""

    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        shape = (layers, batch, kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
              start: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions [start, start + T) and return the keys and values up to them. With
        `start` a one-element tensor (a static-shape decode step, models/generate.py) write that slot
        and return the whole cache: the step's mask hides the slots not written yet."""
        if isinstance(start, torch.Tensor):
            self.keys[layer].index_copy_(2, start, keys)
            self.values[layer].index_copy_(2, start, values)
            return self.keys[layer], self.values[layer]
        end = start + keys.shape[2]
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def positions_of(valid: torch.Tensor) -> torch.Tensor:
    """Position ids of the tokens of a padded batch (pads get 0; they are never attended to)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def attention_mask(key_valid: torch.Tensor, query_slots: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """[B, 1, T, S] booleans: query slot i sees valid key slots j <= i (within the window), and itself."""
    slots = torch.arange(key_valid.shape[-1], device=key_valid.device)
    causal = slots[None, :] <= query_slots[:, None]
    if sliding_window:
        causal &= query_slots[:, None] - slots[None, :] < sliding_window
    mask = causal[None] & key_valid[:, None, :]
    mask |= (slots[None, :] == query_slots[:, None])[None]
    return mask[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
           scale: float | None = None) -> torch.Tensor:
    """SDPA over [B, H, T, D] queries and [B, H_kv, S, D] keys/values (grouped-query when H_kv < H);
    `scale` None is 1/sqrt(D) (1.0 for queries scaled beforehand, as OPT does)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1], scale=scale)
