"""Model function calls (MFCs) as data, and the graph that follows from their keys.

An MFC reads `input_keys` from the batch and writes `output_keys`; an edge runs from the MFC that
writes a key to every MFC that reads it. Keys no MFC writes come from the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence

from ds_realloc.utils.errors import ConfigError


class MFCKind(str, Enum):
    GENERATE = "generate"  # on a layout reallocated from the role's weights
    INFERENCE = "inference"  # likewise (or no model at all: a reward function, the RL targets)
    TRAIN = "train"  # the role's DeepSpeed engine on its training mesh
    SCORE = "score"  # a no-grad forward of the role's training engine, on the training mesh (PPO's recompute)

    @property
    def on_engine(self) -> bool:
        """Runs on the role's own training engine (its mesh, one data-parallel rank per row group)."""
        return self in (MFCKind.TRAIN, MFCKind.SCORE)


@dataclass(frozen=True)
class MFC:
    """One call of one model: e.g. `ref_inf` = inference of role `ref` writing `ref_chosen_logp`."""

    name: str
    role: str
    kind: MFCKind
    input_keys: tuple[str, ...]
    output_keys: tuple[str, ...] = ()
    whole_groups: bool = False  # each data-parallel group must hold all samples of its prompts (GRPO's groups)


def dataset_keys(mfcs: Sequence[MFC]) -> set[str]:
    """Keys read by some MFC and written by none: they must come from the dataset."""
    written = {key for mfc in mfcs for key in mfc.output_keys}
    return {key for mfc in mfcs for key in mfc.input_keys} - written


def topological_order(mfcs: Sequence[MFC]) -> list[MFC]:
    """The MFCs in an order where every writer precedes its readers (ties keep the given order);
    every rank computes the same order, which is what makes SPMD execution deadlock-free."""
    writers: dict[str, str] = {}
    for mfc in mfcs:
        for key in mfc.output_keys:
            if key in writers:
                raise ConfigError(f"MFCs '{writers[key]}' and '{mfc.name}' both write key '{key}'")
            writers[key] = mfc.name
    train_roles: dict[str, str] = {}
    for mfc in mfcs:
        if mfc.kind is MFCKind.TRAIN:
            if mfc.role in train_roles:
                raise ConfigError(f"MFCs '{train_roles[mfc.role]}' and '{mfc.name}' both train role '{mfc.role}'")
            train_roles[mfc.role] = mfc.name
    depends = {mfc.name: {writers[k] for k in mfc.input_keys if k in writers} for mfc in mfcs}
    ordered: list[MFC] = []
    done: set[str] = set()
    while len(ordered) < len(mfcs):
        ready = [m for m in mfcs if m.name not in done and depends[m.name] <= done]
        if not ready:
            raise ConfigError(f"the MFC graph has a cycle among: {', '.join(m.name for m in mfcs if m.name not in done)}")
        ordered.append(ready[0])
        done.add(ready[0].name)
    return ordered
