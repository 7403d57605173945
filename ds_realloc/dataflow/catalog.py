"""The experiments `ds-realloc` knows: the built-in ones, and any `module:NAME` on the command line."""

from __future__ import annotations

import importlib

from ds_realloc.dataflow import experiments, rlhf
from ds_realloc.dataflow.experiment import Experiment, registered
from ds_realloc.utils.errors import UserError

BUILTIN = (experiments, rlhf)  # importing them registered their experiments


def builtin_experiments() -> dict[str, Experiment]:
    """Every registered experiment by command (the built-in ones, and any module registered on import)."""
    return registered()


def is_external(command: str) -> bool:
    return ":" in command


def find_experiment(command: str) -> Experiment:
    """A built-in command, or `module:NAME`: the Experiment `NAME` of an importable module (every rank
    imports it the same way, so an algorithm outside the package runs like a built-in one)."""
    if not is_external(command):
        known = registered()
        if command not in known:
            raise UserError(f"unknown experiment '{command}'; experiments: {', '.join(known)}")
        return known[command]
    module_name, _, attribute = command.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{command}: cannot import module '{module_name}' ({e}); is its folder on PYTHONPATH "
                        f"or the current directory?") from None
    experiment = getattr(module, attribute, None)
    if not isinstance(experiment, Experiment):
        raise UserError(f"{command}: {module_name}.{attribute} is not a ds_realloc.dataflow.experiment.Experiment "
                        f"(got {type(experiment).__name__})")
    return experiment
