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


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_memory() -> int:
    """Start a new peak-memory window; returns the memory in use now (device allocator on GPU, RSS on CPU).
    On CPU the kernel's RSS high-water mark is reset (`/proc/self/clear_refs`), so no sampler is needed."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def peak_memory() -> int:
    """The peak since the last `reset_peak_memory` (device allocator on GPU; RSS high-water mark on CPU,
    the current RSS where the kernel does not report one)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    hwm = _status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else psutil.Process().memory_info().rss


def return_freed_memory() -> None:
    """From now on this process hands freed blocks of 64 KiB or more back to the OS (glibc's mallopt:
    mmap threshold 64 KiB, trim threshold 0) and trims what its heap holds now, so its RSS follows
    the live tensors. A no-op without glibc. Every large allocation becomes an mmap (fresh pages): the
    training runner on CPU sets it at the start (its step times did not change, README), a
    benchmark only around a separate call for its peak memory."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 65536)
    mallopt(m_trim_threshold, 0)
    trim(0)


class PeakMemory:
    """Peak memory above the level at entry while a block runs: the allocator's peak on GPU, the
    process RSS sampled every `interval_s` on CPU (call `return_freed_memory` first, so that freed
    tensors leave the RSS). The sampler and the returned memory slow the block: time it apart."""

    def __init__(self, interval_s: float = 0.0005):
        self.interval_s = interval_s
        self.bytes = 0

    def __enter__(self) -> "PeakMemory":
        import threading

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        process = psutil.Process()
        self._start = process.memory_info().rss
        self._peak = self._start
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, process.memory_info().rss)
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._start
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, psutil.Process().memory_info().rss)
        self.bytes = self._peak - self._start
