"""Running a function on N local ranks (gloo on CPU): the helper distributed tests and benchmarks use.

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
    """A rank raised, died or did not finish in time."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn: Callable, rank: int, world: int, port: int, env: dict, results, args: tuple) -> None:
    os.dup2(2, 1)  # ranks report through the queue; their prints (and DeepSpeed's) go to stderr
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), **env})
    try:
        from ds_realloc.utils.dist import init_distributed, shutdown_distributed

        init_distributed(timeout_s=120)
        value = fn(rank, world, *args)
        shutdown_distributed()
        # plain pickle: tensors travel by value (torch's queue reductions share memory that dies with the child)
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 240, env: dict | None = None) -> list:
    """`fn(rank, world, *args)` on `world` spawned processes; their return values by rank. `env` is set
    before the children start (so it also reaches their C libraries, e.g. malloc tunables)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    # LOCAL_SIZE: every rank is on this host (DeepSpeed's shared-memory all-reduce reads it; comm.shm)
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world)), "LOCAL_SIZE": str(world), **(env or {})}
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, env, results, args), daemon=True)
             for r in range(world)]
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        for p in procs:
            p.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
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
