"""What an experiment is, and the registry of experiments.

An experiment is data: its config tree, model roles, MFC graph, the interface of every MFC, and the
few values of its own config groups the runner needs (`RunSettings`, typed, so the runner never
probes a config). Each experiment module registers its experiments when imported (`register`); an
experiment defined outside the package is selected on the command line as `module:NAME`
(`dataflow.catalog`), so a new algorithm needs no edit under `ds_realloc/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from ds_realloc.algorithms.geometry import StepGeometry
from ds_realloc.algorithms.interface import InferenceInterface, TrainInterface
from ds_realloc.data.tasks import Format
from ds_realloc.dataflow.mfc import MFC
from ds_realloc.engine.config import OptimConfig
from ds_realloc.models.registry import Head

Interface = TrainInterface | InferenceInterface


@dataclass(frozen=True)
class RoleSpec:
    """A model of the experiment: where its weights come from, its head, and whether it is trained."""

    role: str
    path: str
    path_field: str  # the config field that named the path, for error messages
    head: Head
    trainable: bool
    offload: bool = False  # frozen models: keep weights on CPU while idle
    optim: OptimConfig | None = None  # trained models: the optimizer (default: the config's `optim`)


@dataclass(frozen=True)
class InterfaceContext:
    """What interfaces are built with besides the config."""

    tokenizer: Any
    pad_id: int
    eos_ids: tuple[int, ...]
    groups: dict[str, Any] = field(default_factory=dict)  # MFC name -> process group of its role's mesh
    micro_batches: dict[str, int] = field(default_factory=dict)  # training MFC -> its engine's micro-batch size

    def micro_batch(self, trainer: str, default: int) -> int:
        """Samples per forward of the engine of training MFC `trainer` (its scoring calls split alike)."""
        return self.micro_batches.get(trainer, default)


@dataclass(frozen=True)
class RunSettings:
    """What the runner reads of an experiment's own config groups."""

    geometry: StepGeometry
    reference_ema: float = 0.0  # ref.ema: the reference follows the actor after every step
    offload_train_states: bool = False  # rollout.offload_train_states
    eval_prompts: int = 0  # generation evaluation: held-out prompts (0 = all)
    eval_max_new_tokens: int = 16  # generation evaluation: greedy tokens per prompt


def supervised_settings(cfg) -> RunSettings:
    """One row per sample, one optimizer step per training step."""
    return RunSettings(StepGeometry(cfg.train.batch_size, cfg.train.micro_batch_size))


@dataclass(frozen=True)
class Experiment:
    command: str
    summary: str
    config_cls: type
    data_format: Format  # record format of the dataset: sft, pairs or prompts
    sample_key: str  # batch key holding the dataset samples
    mfcs: Callable[[Any], tuple[MFC, ...]]
    roles: Callable[[Any], list[RoleSpec]]
    interfaces: Callable[[Any, InterfaceContext], dict[str, Interface]]  # interface per MFC name
    settings: Callable[[Any], RunSettings] = supervised_settings
    evaluation: Literal["interfaces", "generation"] = "interfaces"
    table: tuple[tuple[str, str], ...] = ()  # (label, metric) columns of the per-step table
    group_train_rows: bool = False  # a training rank must hold all samples of each of its prompts


_REGISTRY: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    """Make `experiment` a command (`ds-realloc <command>`); a command registered twice is an error."""
    if experiment.command in _REGISTRY:
        raise ValueError(f"experiment '{experiment.command}' is already registered")
    _REGISTRY[experiment.command] = experiment
    return experiment


def registered() -> dict[str, Experiment]:
    return dict(_REGISTRY)
