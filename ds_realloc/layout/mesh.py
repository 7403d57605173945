"""Device meshes (ordered sets of global ranks) and parallel strategies, parsed from strings.

Mesh strings: `0-7`, `0,2,4,6`, `0-3,8-11`, or hostfile-relative `node1:0-3` (slots 0-3 of the
second host; needs the slots per host), several hosts joined by `@` as in DeepSpeed's
--include. Strategy strings: `d{dp}t{tp}p{pp}e{ep}` in any order and with any factor left out (`m`
is accepted for `t`), or `zero3` / `zero3:d{dp}` for ZeRO-3 partitions.

Coordinate order: the i-th rank of a mesh with strategy d{dp}t{tp}p{pp} has
    tp_rank = i % tp,  dp_rank = (i // tp) % dp,  pp_rank = i // (tp * dp)
so tensor-parallel groups are consecutive ranks (one node), pipeline stages are outermost. A
`zero3:d{dp}` mesh of n ranks holds n / dp replicas of a dp-way partition, replica = i // dp.

Expert parallelism (`e`, mixture-of-experts models) is carved out of the data-parallel ranks, as in
DeepSpeed-MoE and Megatron: it adds no ranks (`e` must divide `d`) and keeps the coordinates above.
Each expert-parallel group is `e` consecutive data-parallel indices with the same tp and pp ranks,
    ep_rank = dp_rank % ep,  group = dp_rank // ep;
rows still split over all `d` indices, while the experts of every MoE layer split over the group
(ep_rank r holds experts [r*E/e, (r+1)*E/e), each still split tp ways inside) and every other
parameter stays replicated over `d`. A token's hidden state goes to the group rank holding each
expert it is routed to and comes back (all-to-all inside the group).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from ds_realloc.utils.errors import ConfigError


@dataclass(frozen=True)
class DeviceMesh:
    """An ordered tuple of distinct global ranks."""

    ranks: tuple[int, ...]

    def __post_init__(self):
        if not self.ranks:
            raise ConfigError("a device mesh needs at least one rank")
        if len(set(self.ranks)) != len(self.ranks):
            raise ConfigError(f"device mesh {self} lists a rank twice")
        if min(self.ranks) < 0:
            raise ConfigError(f"device mesh {self} has a negative rank")

    @property
    def size(self) -> int:
        return len(self.ranks)

    def index(self, rank: int) -> int:
        return self.ranks.index(rank)

    def __contains__(self, rank: int) -> bool:
        return rank in self.ranks

    def __str__(self) -> str:
        """Ranges where ranks are consecutive, in mesh order: `0-7`, `0,2,4`, `4-7,0-3`."""
        parts, start = [], 0
        for i in range(1, len(self.ranks) + 1):
            if i == len(self.ranks) or self.ranks[i] != self.ranks[i - 1] + 1:
                first, last = self.ranks[start], self.ranks[i - 1]
                parts.append(f"{first}-{last}" if last > first else str(first))
                start = i
        return ",".join(parts)


def _span(text: str, where: str) -> list[int]:
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not match:
        raise ConfigError(f"{where}: cannot read '{text}' as a rank or a range a-b")
    first, last = int(match.group(1)), int(match.group(2) or match.group(1))
    if last < first:
        raise ConfigError(f"{where}: range '{text}' ends before it starts")
    return list(range(first, last + 1))


def parse_mesh(text: str, slots_per_host: Sequence[int] | None = None, where: str = "mesh") -> DeviceMesh:
    """A mesh from global ranks (`0-7`, `0,2,4,6`) or, as DeepSpeed's --include writes it, host specs
    `node1:0-3` / `node0:0,2@node1:1` (the number ending the host name is its index in the hostfile)."""
    ranks: list[int] = []
    for spec in text.split("@"):
        host, sep, local = spec.rpartition(":")
        if not sep:
            for part in spec.split(","):
                ranks += _span(part, where)
            continue
        host_match = re.fullmatch(r"\s*[A-Za-z0-9_.-]*?(\d+)\s*", host)
        if not host_match:
            raise ConfigError(f"{where}: cannot read host '{host}' in '{text}' (expected e.g. node1:0-3)")
        if slots_per_host is None:
            raise ConfigError(f"{where}: '{text}' names a host but the number of slots per host is unknown (set launch.hostfile)")
        node = int(host_match.group(1))
        if node >= len(slots_per_host):
            raise ConfigError(f"{where}: host {node} in '{text}' does not exist ({len(slots_per_host)} hosts)")
        offset = sum(slots_per_host[:node])
        for part in local.split(","):
            for slot in _span(part, where):
                if slot >= slots_per_host[node]:
                    raise ConfigError(f"{where}: slot {slot} of host {node} does not exist "
                                      f"({slots_per_host[node]} slots)")
                ranks.append(offset + slot)
    return DeviceMesh(tuple(ranks))


@dataclass(frozen=True)
class Strategy:
    """How a mesh is split: data x tensor x pipeline parallel degrees (expert parallelism inside the
    data-parallel degree), or ZeRO-3 partitions."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero3: bool = False
    ep: int = 1

    def __post_init__(self):
        if min(self.dp, self.tp, self.pp, self.ep) < 1:
            raise ConfigError(f"strategy {self}: degrees must be >= 1")
        if self.zero3 and (self.tp, self.pp, self.ep) != (1, 1, 1):
            raise ConfigError(f"strategy {self}: ZeRO-3 partitions are data parallel only")
        if self.dp % self.ep:
            raise ConfigError(f"strategy {self}: the expert-parallel degree e={self.ep} must divide d={self.dp} "
                              f"(experts are split over data-parallel ranks)")

    @property
    def size(self) -> int:
        return self.dp * self.tp * self.pp

    def coords(self, index: int) -> tuple[int, int, int]:
        """(dp_rank, tp_rank, pp_rank) of the index-th rank of a mesh (see the module docstring)."""
        return (index // self.tp) % self.dp, index % self.tp, index // (self.tp * self.dp)

    def index(self, dp_rank: int, tp_rank: int, pp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def expert_group(self, dp_rank: int) -> tuple[int, ...]:
        """The data-parallel indices of `dp_rank`'s expert-parallel group, in ep-rank order."""
        first = dp_rank - dp_rank % self.ep
        return tuple(range(first, first + self.ep))

    def __str__(self) -> str:
        if self.zero3:
            return f"zero3:d{self.dp}"
        return f"d{self.dp}t{self.tp}p{self.pp}" + (f"e{self.ep}" if self.ep > 1 else "")


def parse_strategy(text: str, mesh_size: int | None = None, where: str = "strategy") -> Strategy:
    """A strategy from `d2t2`, `t4d2p1`, `m2` (= t2), `d2e2` (experts split 2 ways inside d2), `zero3`
    (over the whole mesh) or `zero3:d4`."""
    text = text.strip().lower()
    zero = re.fullmatch(r"zero3(?::d(\d+))?", text)
    if zero:
        dp = int(zero.group(1)) if zero.group(1) else mesh_size
        if dp is None:
            raise ConfigError(f"{where}: '{text}' needs the mesh size (or write zero3:d<N>)")
        if mesh_size is not None and mesh_size % dp:
            raise ConfigError(f"{where}: zero3:d{dp} does not divide a mesh of {mesh_size} ranks")
        return Strategy(dp=dp, zero3=True)
    parts = re.findall(r"([dtmpe])(\d+)", text)
    if not parts or "".join(f"{k}{v}" for k, v in parts) != text:
        raise ConfigError(f"{where}: cannot read '{text}'; expected e.g. d2t2, t4p2, m2, d2e2 or zero3")
    degrees = {"d": 1, "t": 1, "p": 1, "e": 1}
    seen = set()
    for key, value in parts:
        key = "t" if key == "m" else key
        if key in seen:
            raise ConfigError(f"{where}: '{text}' gives the {key} degree twice")
        seen.add(key)
        degrees[key] = int(value)
    if degrees["d"] % degrees["e"]:
        raise ConfigError(f"{where}: in '{text}' the expert-parallel degree e{degrees['e']} must divide "
                          f"d{degrees['d']} (experts are split over data-parallel ranks)")
    strategy = Strategy(dp=degrees["d"], tp=degrees["t"], pp=degrees["p"], ep=degrees["e"])
    if mesh_size is not None and strategy.size != mesh_size:
        raise ConfigError(f"{where}: {text} needs {strategy.size} ranks, the mesh has {mesh_size}")
    return strategy
