"""Moving the per-sample data of a step between the meshes of model function calls.

A step has N rows (samples). An MFC on a d x t layout splits them into dp contiguous ranges; every
rank of data-parallel group g (its tp ranks) holds rows [g*N/dp, (g+1)*N/dp) of what the MFC reads
and writes. Before an MFC runs, each of its ranks receives the rows of its inputs it does not hold
from the first rank of a producing group that does; ranks that hold them already move nothing.
Plans are pure: every rank computes the same list of messages and works through it in one global
order, so blocking sends and receives cannot deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch.distributed as dist


@dataclass(frozen=True)
class RowSplit:
    """Which ranks hold which rows: group g (a tuple of ranks) holds rows [g*N/G, (g+1)*N/G)."""

    groups: tuple[tuple[int, ...], ...]
    rows: int

    def __post_init__(self):
        if self.rows % len(self.groups):
            raise ValueError(f"{self.rows} rows do not split evenly over {len(self.groups)} data-parallel groups")

    @property
    def per_group(self) -> int:
        return self.rows // len(self.groups)

    def group_of(self, rank: int) -> int | None:
        for g, ranks in enumerate(self.groups):
            if rank in ranks:
                return g
        return None

    def rows_of(self, rank: int) -> range:
        g = self.group_of(rank)
        return range(0) if g is None else range(g * self.per_group, (g + 1) * self.per_group)

    def holders(self, row: int) -> tuple[int, ...]:
        return self.groups[row // self.per_group]


@dataclass(frozen=True)
class Message:
    src: int
    dst: int
    rows: tuple[int, ...]


def route(producer: RowSplit, consumer: RowSplit) -> list[Message]:
    """The messages that give every consumer rank the rows it needs and lacks, in one global order."""
    messages: dict[tuple[int, int], list[int]] = {}
    for g, ranks in enumerate(consumer.groups):
        for row in range(g * consumer.per_group, (g + 1) * consumer.per_group):
            holders = producer.holders(row)
            for rank in ranks:
                if rank not in holders:
                    messages.setdefault((holders[0], rank), []).append(row)
    return [Message(src, dst, tuple(rows)) for (src, dst), rows in sorted(messages.items())]


def exchange(messages: list[Message], values: Mapping[str, Mapping[int, Any]], keys: tuple[str, ...],
             into: dict[str, dict[int, Any]]) -> int:
    """Do this rank's sends and receives of `messages` for `keys` (values picklable, tensors on CPU);
    received rows are stored in `into`. Returns the number of rows received."""
    rank = dist.get_rank()
    received = 0
    for message in messages:
        if message.src == rank:
            payload = {key: [values[key][row] for row in message.rows] for key in keys}
            dist.send_object_list([payload], dst=message.dst)
        elif message.dst == rank:
            box: list = [None]
            dist.recv_object_list(box, src=message.src)
            for key, items in box[0].items():
                into.setdefault(key, {}).update(zip(message.rows, items))
            received += len(message.rows)
    return received
