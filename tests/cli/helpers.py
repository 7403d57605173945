"""Running `ds-realloc` as a user would, in a subprocess with a timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TINY_RUN = ["model.path=tiny-llama", "train.batch_size=8", "train.micro_batch_size=2"]


def run_cli(args: list[str], cwd: Path, timeout: float = 300, launcher: list[str] | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`ds-realloc <args>` (or `<launcher> -m ds_realloc <args>`); a hang fails the test via the timeout."""
    command = (launcher or [sys.executable, "-m", "ds_realloc"]) + args
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def run_main(args: list[str]) -> subprocess.CompletedProcess:
    """`ds-realloc <args>` in this process, for commands that end before starting any rank (bad input,
    tools): the exit code and what it printed, without paying an interpreter start per call."""
    import contextlib
    import io

    from ds_realloc.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


# ----------------------------------------------------------------------------------------------
# Golden metrics: behaviour-preserving refactors must reproduce these runs (see golden/README.md)

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_ENV = {"OMP_NUM_THREADS": "1"}  # the thread count the golden files were recorded with
UNTIMED = ("time/", "realloc/", "mem/", "tokens_per_s")  # clocks, memory and throughput differ run to run


def _timeless(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(UNTIMED) and not k.endswith(UNTIMED)}


def check_golden(name: str, run_dir: Path, abs_tol: float = 1e-6) -> None:
    """The run's metrics.jsonl equals golden/<name>.jsonl within 1e-6 relative or `abs_tol` on every
    key but timings and memory; with DS_REALLOC_UPDATE_GOLDEN=1 the run's metrics become the golden
    file instead."""
    import pytest

    rows = [_timeless(row) for row in metrics(run_dir)]
    path = GOLDEN / f"{name}.jsonl"
    if os.environ.get("DS_REALLOC_UPDATE_GOLDEN") == "1":
        write_jsonl(path, rows)
        return
    expected = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in expected], name
    for got, want in zip(rows, expected):
        assert sorted(got) == sorted(want), (name, got["step"], set(got) ^ set(want))
        assert got == pytest.approx(want, rel=1e-6, abs=abs_tol), (name, got["step"])
