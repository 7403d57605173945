"""Reward functions: `module:function(prompts, completions, **fields) -> list[float]`, where the
fields are the prompt records' other fields (e.g. `answer`), one list per field.

Built-in verifiable reward for the built-in tasks: `final_number_matches` (1 when the last number
of the completion equals the record's answer, else 0).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable, Sequence

from ds_realloc.data.tasks import final_number
from ds_realloc.utils.errors import ConfigError

RewardFunction = Callable[..., list[float]]


def final_number_matches(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str | None],
                         **fields) -> list[float]:
    """1.0 when the completion's final number is the reference answer (numbers compared as values)."""
    scores = []
    for completion, expected in zip(completions, answer):
        got = final_number(completion)
        scores.append(float(got is not None and expected is not None and float(got) == float(expected)))
    return scores


def load_reward_function(spec: str, field: str = "reward.function") -> RewardFunction:
    """The function named by `module:function`, checked to accept (prompts, completions, ...)."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ConfigError(f"{field}: '{spec}' is not of the form module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{field}: cannot import module '{module_name}': {e}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"{field}: module '{module_name}' has no function '{name}'")
    try:
        inspect.signature(function).bind_partial([], [])
    except TypeError:
        raise ConfigError(f"{field}: {spec} must accept (prompts, completions, **fields)") from None
    return function


def call_reward(function: RewardFunction, prompts: list[str], completions: list[str], fields: dict[str, list],
                where: str) -> list[float]:
    """Scores of a batch, checked: one finite float per completion."""
    scores = function(prompts, completions, **fields)
    if len(scores) != len(completions):
        raise ConfigError(f"{where} returned {len(scores)} scores for {len(completions)} completions")
    try:
        return [float(s) for s in scores]
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must return numbers, got {scores[:3]!r}") from None
