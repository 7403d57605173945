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


def headline(report: dict, ours: tuple[str, ...], baselines: tuple[str, ...], metric: str,
             higher_is_better: bool = True, memory: str | None = "peak_mem_bytes") -> dict:
    """The ratio a benchmark is judged by: our best row against the strongest baseline row (by
    `metric`), and the peak-memory ratio of those two rows when measured."""
    def better(name: str) -> float:
        value = report[name][metric]
        return value if higher_is_better else -value

    best_ours, best_baseline = max(ours, key=better), max(baselines, key=better)
    ours_value, baseline_value = report[best_ours][metric], report[best_baseline][metric]
    ratio = ours_value / baseline_value if higher_is_better else baseline_value / ours_value
    out = {"best": best_ours, "best_baseline": best_baseline, "speedup_vs_best": ratio}
    if memory is not None:
        out["mem_ratio_vs_best"] = report[best_ours][memory] / max(report[best_baseline][memory], 1)
    return out
