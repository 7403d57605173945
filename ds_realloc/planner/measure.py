"""`ds-realloc profile`: measure this machine into a device profile (JSON) for the planner.

Each rank of a job gets `cores / ranks` threads, so the device measured is one such rank: its matmul
throughput per dtype (the best of a few GEMM shapes a transformer runs), its memory bandwidth (a
copy of a buffer far larger than the caches), and the collectives between the job's ranks (an
all-reduce timed at several sizes over the backend the runner uses, fitted as latency + size /
bandwidth). Nothing here reads a run the planner is judged on.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import psutil
import torch

from ds_realloc.planner.measure_calls import best_s, measure_model
from ds_realloc.planner.profile import DeviceProfile, Link
from ds_realloc.planner.profile_config import ProfileConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_GEMMS = ((2048, 2048, 2048), (4096, 1024, 1024), (512, 4096, 1024))  # (m, n, k)


def matmul_flops(dtype: torch.dtype, repeats: int) -> float:
    """The best FLOP/s over the GEMM shapes."""
    best = 0.0
    for m, n, k in _GEMMS:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        best = max(best, 2 * m * n * k / best_s(lambda: a @ b, repeats))
    return best


def memory_bandwidth(repeats: int, nbytes: int = 1 << 29) -> float:
    """Bytes read and written per second by a copy of `nbytes` (512 MiB: past any cache)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return 2 * nbytes / best_s(lambda: dst.copy_(src), repeats)


def _fit(sizes: list[int], seconds: list[float]) -> Link:
    """Least squares of seconds = latency + bytes / bandwidth (latency clamped at 0)."""
    mean_x, mean_y = statistics.fmean(sizes), statistics.fmean(seconds)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes, seconds)) / sum((x - mean_x) ** 2 for x in sizes)
    return Link(bandwidth=1.0 / max(slope, 1e-15), latency=max(0.0, mean_y - slope * mean_x))


def _collective_rank(rank: int, world: int, repeats: int) -> Link | None:
    """An all-reduce ring's per-rank bus bandwidth and per-step latency on this job's backend."""
    import torch.distributed as dist

    sizes = [1 << 12, 1 << 16, 1 << 20, 1 << 23, 1 << 25]
    seconds = []
    for size in sizes:
        tensor = torch.ones(size // 4)

        def reduce():
            dist.all_reduce(tensor)
            dist.barrier()

        seconds.append(best_s(reduce, repeats))
    if rank:
        return None
    steps = 2 * (world - 1)
    moved = [2 * (world - 1) / world * s for s in sizes]  # the ring's bytes per rank
    link = _fit(moved, seconds)
    return Link(link.bandwidth, link.latency / steps)


def measure(cfg: ProfileConfig) -> DeviceProfile:
    from ds_realloc.utils.spawn import run_ranks

    threads = max(1, (os.cpu_count() or 1) // cfg.ranks)
    torch.set_num_threads(threads)
    flops = {name: matmul_flops(dtype, cfg.repeats) for name, dtype in _DTYPES.items()}
    bandwidth = memory_bandwidth(cfg.repeats)
    link = run_ranks(_collective_rank, cfg.ranks, cfg.repeats)[0] if cfg.ranks > 1 else Link(bandwidth, 0.0)
    memory = psutil.virtual_memory().total // cfg.ranks
    models = {}
    if cfg.model:
        from ds_realloc.models.presets import resolve_model_path

        models = measure_model(cfg, resolve_model_path(cfg.model, field="model"))
    return DeviceProfile(
        name=cfg.name, memory_bytes=memory, matmul_flops=flops, memory_bandwidth=bandwidth, intra_node=link,
        inter_node=link, host_bandwidth=bandwidth, host_adam_params_per_s=bandwidth / 30, gpus_per_node=cfg.ranks,
        models=models,
        source=f"ds-realloc profile on {os.uname().nodename}: {threads} thread(s) per rank, {cfg.ranks} ranks, "
               f"torch {torch.__version__}; memory is the host's divided by the ranks; the host is the device, so "
               f"offload moves at memory bandwidth and Adam runs at memory bandwidth / 30 bytes per parameter")


def main(cfg: ProfileConfig) -> dict:
    profile = measure(cfg)
    data = profile.to_json()
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(data, indent=2) + "\n")
    return data
