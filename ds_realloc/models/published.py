"""The names HF checkpoints publish a model's tensors under, where they differ from the live ones.

transformers (5.x) holds a mixture-of-experts layer's experts fused, `mlp.experts.gate_up_proj`
[experts, 2 x intermediate, hidden] and `mlp.experts.down_proj` [experts, hidden, intermediate],
while published checkpoints (and its own `save_pretrained`) hold one tensor per expert: Mixtral's
`block_sparse_moe.experts.{j}.w1` (gate), `.w3` (up), `.w2` (down) and `block_sparse_moe.gate` (the
router); Qwen3-MoE's `mlp.experts.{j}.gate_proj`, `.up_proj`, `.down_proj`. The row-major flattening
of a fused tensor is the concatenation of its published tensors' flattenings in the order
`published_names` lists them (expert 0's gate, expert 0's up, expert 1's gate, ...; the down
tensors by expert), so a reader serves any flat range of the live tensor from those pieces and a
writer splits the live tensor into them by rows. Every other tensor is published under its live name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertNames:
    block: str  # the published name of the MoE block (the live one is `mlp`)
    gate_up: tuple[str, str]  # the published gate and up projections of one expert
    down: str


EXPERT_NAMES = {
    "mixtral": ExpertNames("block_sparse_moe", ("w1", "w3"), "w2"),
    "qwen3_moe": ExpertNames("mlp", ("gate_proj", "up_proj"), "down_proj"),
}

# the config field of the expert count: transformers 5.x writes num_local_experts for both families,
# published Qwen3-MoE configs say num_experts
COUNT_KEYS = ("num_local_experts", "num_experts")

_FUSED = re.compile(r"(?P<layer>.+)\.mlp\.(?P<what>experts\.gate_up_proj|experts\.down_proj|gate\.weight)")


def published_names(name: str, model_type: str | None, num_experts: int) -> list[str]:
    """The published tensors that make up the live tensor `name`, in flattening order ([name] when
    it is published as is)."""
    names = EXPERT_NAMES.get(model_type)
    match = _FUSED.fullmatch(name)
    if names is None or match is None:
        return [name]
    block = f"{match['layer']}.{names.block}"
    if match["what"] == "gate.weight":
        return [f"{block}.gate.weight"]
    if match["what"] == "experts.down_proj":
        return [f"{block}.experts.{j}.{names.down}.weight" for j in range(num_experts)]
    return [f"{block}.experts.{j}.{piece}.weight" for j in range(num_experts) for piece in names.gate_up]


def live_shape(name: str, piece_shapes: list[tuple[int, ...]], num_experts: int) -> tuple[int, ...]:
    """The live shape of `name` from the shapes of its published pieces (as `published_names` orders them)."""
    if not name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        return piece_shapes[0]
    rows, columns = piece_shapes[0]
    return num_experts, rows * (len(piece_shapes) // num_experts), columns


def split_published(name: str, tensor: torch.Tensor, model_type: str | None) -> list[tuple[str, torch.Tensor]]:
    """(published name, tensor) pairs of the live tensor `name` (views of it, split by rows)."""
    names = published_names(name, model_type, tensor.shape[0] if tensor.dim() == 3 else 0)
    if names == [name]:
        return [(name, tensor)]
    return list(zip(names, tensor.reshape(len(names), -1, tensor.shape[-1]).unbind(0)))
