"""Distributed tests spawn their ranks with the library's helper (timeouts, child tracebacks)."""

from ds_realloc.utils.spawn import RankFailed, free_port, run_ranks

__all__ = ["RankFailed", "free_port", "run_ranks"]
