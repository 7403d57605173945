"""Memory readings for per-step logs: host RSS, and the device peak since the last reading."""

from __future__ import annotations

import psutil
import torch


def memory_stats() -> dict[str, float]:
    """`mem/rss_bytes` (this process) and, on GPU, `mem/device_peak_bytes` since the previous call."""
    stats = {"mem/rss_bytes": float(psutil.Process().memory_info().rss)}
    if torch.cuda.is_available():
        stats["mem/device_peak_bytes"] = float(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
    return stats
