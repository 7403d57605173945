"""Built-in tasks, generated deterministically (no downloads), so every command has default data.

`arith`: single-digit arithmetic (`What is 7 - 9?`), verifiable by the final number of a completion.
All 300 problems are split once by a fixed seed: 64 held out for evaluation, the rest for training.
"""

from __future__ import annotations

import random
import re
from typing import Callable, Literal

from ds_realloc.data.records import Record
from ds_realloc.utils.errors import DataError

Format = Literal["sft", "pairs", "prompts"]
Split = Literal["train", "eval"]

_SPLIT_SEED = 20240601
EVAL_PROBLEMS = 64
_OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _arith_problems(split: Split) -> list[tuple[int, str, int]]:
    problems = [(a, op, b) for a in range(10) for op in _OPS for b in range(10)]
    random.Random(_SPLIT_SEED).shuffle(problems)
    return problems[:EVAL_PROBLEMS] if split == "eval" else problems[EVAL_PROBLEMS:]


def _arith_records(split: Split, fmt: Format) -> list[dict]:
    rng = random.Random(_SPLIT_SEED + (fmt == "pairs"))
    records = []
    for a, op, b in _arith_problems(split):
        result = _OPS[op](a, b)
        prompt = f"What is {a} {op} {b}?"
        solution = f"{a} {op} {b} = {result}"
        if fmt == "sft":
            records.append({"prompt": prompt, "answer": solution})
        elif fmt == "prompts":
            records.append({"prompt": prompt, "answer": str(result)})
        else:  # a wrong answer near the right one, so the pairs are not trivial
            wrong = result + rng.choice([-3, -2, -1, 1, 2, 3])
            records.append({"prompt": prompt, "chosen": solution, "rejected": f"{a} {op} {b} = {wrong}"})
    return records


TASKS: dict[str, Callable[[Split, Format], list[dict]]] = {"arith": _arith_records}

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The last number in a completion (the answer of a verifiable arithmetic task)."""
    numbers = _NUMBER.findall(text.replace(",", ""))
    return numbers[-1] if numbers else None


def builtin_records(spec: str, split: Split, fmt: Format) -> list[Record]:
    """Records of `builtin:<task>` for one split, in the given format."""
    task = spec.removeprefix("builtin:")
    if task not in TASKS:
        raise DataError(f"unknown built-in task '{spec}'; built-in tasks: {', '.join('builtin:' + t for t in TASKS)}")
    return [Record(f"{spec}/{split}#{i}", fields) for i, fields in enumerate(TASKS[task](split, fmt))]
