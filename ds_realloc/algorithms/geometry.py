"""The geometry of a training step: how its rows divide over ranks, passes, minibatches and micro-batches.

A step has `prompts x samples_per_prompt` rows. A training mesh of `dp` ranks gives each rank
`rows / dp` of them; each of `epochs` passes over those takes `minibatches` optimizer steps of
`rows / dp / minibatches` consecutive rows, in micro-batches of at most `micro_batch_size` rows. One
frozen value, checked once, owns every size derived from it (the DeepSpeed batch config, the
update's split and the recompute's, which must pad each micro-batch alike), so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ds_realloc.utils.errors import ConfigError


def micro_slices(batch_len: int, micro_batch_size: int) -> list[slice]:
    """Consecutive micro-batches of a batch."""
    return [slice(i, min(i + micro_batch_size, batch_len)) for i in range(0, batch_len, micro_batch_size)]


def update_minibatches(rows: int, count: int) -> list[list[int]]:
    """The rows of each optimizer step of a pass over a rank's `rows` (consecutive, equal)."""
    size = rows // count
    return [list(range(i * size, (i + 1) * size)) for i in range(count)]


def update_micro_batches(rows: int, minibatches: int, micro_batch_size: int) -> list[list[int]]:
    """The rows of each forward of a pass, in order: the one split the update and the recompute
    share, so both pad every micro-batch the same way."""
    return [[minibatch[i] for i in range(r.start, r.stop)] for minibatch in update_minibatches(rows, minibatches)
            for r in micro_slices(len(minibatch), micro_batch_size)]


@dataclass(frozen=True)
class StepGeometry:
    prompts: int  # train.batch_size
    micro_batch_size: int  # train.micro_batch_size
    samples_per_prompt: int = 1
    minibatches: int = 1  # optimizer steps per pass
    epochs: int = 1  # passes over the step's rows

    @property
    def rows(self) -> int:
        return self.prompts * self.samples_per_prompt

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps per training step."""
        return self.epochs * self.minibatches

    def with_micro_batch(self, micro_batch_size: int | None) -> "StepGeometry":
        """The geometry of an engine with its own micro-batch size (None: this one's)."""
        return self if micro_batch_size is None else replace(self, micro_batch_size=micro_batch_size)

    def minibatch_rows(self, dp: int) -> int:
        return self.rows // dp // self.minibatches

    def micro_batch(self, dp: int) -> int:
        """Rows per forward on each of `dp` ranks (fewer than micro_batch_size when a minibatch is smaller)."""
        return min(self.micro_batch_size, max(self.minibatch_rows(dp), 1))

    def accumulation(self, dp: int) -> int:
        """Forwards per optimizer step on each of `dp` ranks."""
        return max(self.minibatch_rows(dp) // self.micro_batch(dp), 1)

    def check(self, mfc: str, dp: int, micro_field: str = "train.micro_batch_size") -> None:
        """Every one of `dp` training ranks splits its rows into whole minibatches of whole micro-batches."""
        per_rank = self.rows // dp
        if per_rank % self.minibatches or self.minibatch_rows(dp) % self.micro_batch(dp):
            split = f" x {self.minibatches} algo.minibatches" if self.minibatches > 1 else ""
            sequences = f" ({self.rows} sequences)" if self.rows != self.prompts else ""
            raise ConfigError(f"allocations.{mfc}: train.batch_size={self.prompts}{sequences} is not divisible by "
                              f"{micro_field}={self.micro_batch_size} x {dp} data-parallel ranks{split}")
