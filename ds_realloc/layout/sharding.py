"""How each parameter splits across tensor-parallel ranks: rules keyed by HF parameter names.

A rule turns (full shape, tp, tp_rank) into the local shard shape and the Runs that place the
shard's elements in it (see runs.py). Rules are pure data; `ModelSpec` (model.py) applies them.

- Replicated: norms, position embeddings, row-parallel biases.
- Split(dim): column-parallel weights and biases (dim 0 of nn.Linear), row-parallel weights
  (dim 1), vocab-parallel embeddings / LM head (dim 0; the vocab may split unevenly, the last
  shard is then zero-padded). `unit` > 1 keeps units (attention heads) whole and demands
  divisibility.
- KVHeads: GQA keys / values: heads split when tp divides them, each head group replicated on
  tp / n_kv ranks when n_kv divides tp, an error otherwise.
- FusedSplit(dim, sections): GPT-2's fused c_attn: the dim is [q | k | v], each section split
  and the rank's parts concatenated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ds_realloc.layout.runs import Run
from ds_realloc.utils.errors import ConfigError


def _split_runs(shape: tuple[int, ...], dim: int, start: int, size: int, local_size: int,
                local_start: int = 0, local_dim: int | None = None) -> Run:
    """Indices [start, start + size) along `dim`, placed at [local_start, ...) of a local dim of `local_dim`."""
    outer = math.prod(shape[:dim])
    inner = math.prod(shape[dim + 1:])
    local_dim = local_size if local_dim is None else local_dim
    return Run.make(start * inner, shape[dim] * inner, local_start * inner, local_dim * inner, size * inner, outer)


@dataclass(frozen=True)
class Replicated:
    def shard(self, shape: tuple[int, ...], tp: int, tp_rank: int, name: str) -> tuple[tuple[int, ...], tuple[Run, ...]]:
        numel = math.prod(shape)
        return shape, (Run.make(0, numel, 0, numel, numel, 1),)


@dataclass(frozen=True)
class Split:
    dim: int
    unit: int = 1  # split at multiples of `unit` along dim (e.g. head_dim), which must divide evenly
    uneven: bool = False  # allow ceil-sized shards with zero padding (vocab-parallel tables)

    def shard(self, shape, tp, tp_rank, name):
        size = shape[self.dim]
        units = size // self.unit
        if self.uneven:
            part = -(-size // tp)
        else:
            if size % self.unit or units % tp:
                what = f"{units} heads" if self.unit > 1 else f"size {size}"
                raise ConfigError(f"tp={tp} does not divide {name} along dim {self.dim} ({what})")
            part = size // tp
        start = min(tp_rank * part, size)
        valid = min(part, size - start)
        local_shape = shape[:self.dim] + (part,) + shape[self.dim + 1:]
        if valid <= 0:
            return local_shape, ()
        return local_shape, (_split_runs(shape, self.dim, start, valid, part),)


@dataclass(frozen=True)
class KVHeads:
    n_kv: int
    head_dim: int

    def shard(self, shape, tp, tp_rank, name):
        if self.n_kv % tp == 0:
            return Split(0, self.head_dim).shard(shape, tp, tp_rank, name)
        if tp % self.n_kv:
            raise ConfigError(f"tp={tp} and num_key_value_heads={self.n_kv} do not divide one another ({name}); "
                              f"use a tp that divides {self.n_kv} or a multiple of it")
        head = tp_rank // (tp // self.n_kv)  # heads replicated on tp / n_kv consecutive ranks
        local_shape = (self.head_dim,) + shape[1:]
        return local_shape, (_split_runs(shape, 0, head * self.head_dim, self.head_dim, self.head_dim),)


@dataclass(frozen=True)
class FusedSplit:
    dim: int
    sections: int = 3
    unit: int = 1

    def shard(self, shape, tp, tp_rank, name):
        section = shape[self.dim] // self.sections
        if (section // self.unit) % tp or section % self.unit:
            raise ConfigError(f"tp={tp} does not divide the {section // self.unit} heads of {name}")
        part = section // tp
        local = self.sections * part
        runs = tuple(_split_runs(shape, self.dim, s * section + tp_rank * part, part, part, s * part, local)
                     for s in range(self.sections))
        return shape[:self.dim] + (local,) + shape[self.dim + 1:], runs


ShardRule = Replicated | Split | KVHeads | FusedSplit
