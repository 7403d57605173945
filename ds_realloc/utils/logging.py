"""One logger per module: rank 0 prints to the console, every rank may also log to its own file."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

_FORMAT = "%(asctime)s [%(levelname)s] [rank{rank}] %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    """The logger of a module (`get_logger(__name__)`); handlers are set once by `setup_logging`."""
    return logging.getLogger(name)


def setup_logging(rank: int, log_dir: str | Path | None = None, level: int = logging.INFO) -> None:
    """Console output on rank 0 only (warnings and errors on every rank); a per-rank file if `log_dir`."""
    root = logging.getLogger("ds_realloc")
    root.setLevel(level)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(_FORMAT.format(rank=rank), datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter)
    console.setLevel(level if rank == 0 else logging.WARNING)
    root.addHandler(console)
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(Path(log_dir) / f"rank{rank}.log")
        to_file.setFormatter(formatter)
        root.addHandler(to_file)


def env_rank() -> int:
    """The global rank from the launcher's environment (0 outside a distributed job)."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0
