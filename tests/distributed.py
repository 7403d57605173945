"""The one helper distributed tests use: spawn N gloo ranks, each running `fn(rank, world, *args)`.

Every run has a timeout (a hang is a failure), and a child's traceback is re-raised in the parent.
`fn` must be a module-level function (spawned children import it by name).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import time
import traceback
from typing import Any, Callable


class RankFailed(AssertionError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn: Callable, rank: int, world: int, port: int, env: dict, results, args: tuple) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1", **env})
    try:
        import torch.distributed as dist

        from ds_realloc.utils.dist import init_distributed

        init_distributed(timeout_s=120)
        value = fn(rank, world, *args)
        dist.barrier()
        # plain pickle: tensors travel by value (torch's queue reductions share memory that dies with the child)
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 240, env: dict | None = None) -> list:
    """`fn(rank, world, *args)` on `world` spawned processes; their return values by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, env or {}, results, args), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world:
            try:
                rank, ok, value = results.get(timeout=0.2)
            except Exception:  # queue.Empty
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in values]
                if dead:
                    raise RankFailed(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}") from None
                if time.monotonic() > deadline:
                    raise RankFailed(f"timed out after {timeout:.0f} s; ranks done: {sorted(values)}") from None
                continue
            if not ok:
                raise RankFailed(f"rank {rank} failed:\n{value}")
            values[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [values[r] for r in range(world)]
