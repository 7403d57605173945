"""Benchmarks: CLI commands that measure ours and a named baseline in one run and print the ratio."""

from __future__ import annotations

import json
from typing import Callable


def bench_main(args: list[str], config_cls: type, run: Callable[[object], dict],
               format_report: Callable[[dict], str]) -> int:
    """`ds-realloc bench <name> [key=value ...] [--json]`: run, then print the report (JSON or text)."""
    from ds_realloc.utils.config import load_config

    cfg = load_config(config_cls, None, [a for a in args if a != "--json"])
    report = run(cfg)
    print(json.dumps(report, indent=2) if "--json" in args else format_report(report))
    return 0
