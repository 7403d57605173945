"""Deterministic batch order: the global batch of step k is a pure function of (seed, k), so a
resumed run reads exactly the batches an uninterrupted run would have read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_realloc.utils.errors import ConfigError


@dataclass(frozen=True)
class StepSampler:
    """Global batches of `batch_size` dataset indices; epoch e is a permutation seeded by seed + e."""

    num_samples: int
    batch_size: int
    seed: int
    shuffle: bool = True

    def __post_init__(self):
        if self.num_samples < self.batch_size:
            raise ConfigError(f"train.batch_size={self.batch_size} is larger than the dataset ({self.num_samples} samples)")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.batch_size  # the incomplete last batch of an epoch is dropped

    def global_batch(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.num_samples)
        return order[index * self.batch_size:(index + 1) * self.batch_size].tolist()


def rank_slice(indices: list[int], rank: int, world_size: int) -> list[int]:
    """The contiguous part of a global batch that one data-parallel rank processes."""
    per_rank = len(indices) // world_size
    return indices[rank * per_rank:(rank + 1) * per_rank]


def eval_shard(num_samples: int, rank: int, world_size: int) -> list[tuple[int, bool]]:
    """(index, counts) pairs of one rank's share of an eval set, padded so every rank runs the same
    number of forwards (ZeRO-3 gathers are collectives); padding repeats index 0 and does not count."""
    per_rank = -(-num_samples // world_size)
    shard = []
    for i in range(rank * per_rank, (rank + 1) * per_rank):
        shard.append((i, True) if i < num_samples else (0, False))
    return shard


def micro_batches(items: list, micro_batch_size: int) -> list[list]:
    """Consecutive chunks of at most `micro_batch_size` items."""
    return [items[i:i + micro_batch_size] for i in range(0, len(items), micro_batch_size)]
