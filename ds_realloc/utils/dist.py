"""Joining the job's process group whichever launcher started it (deepspeed, torchrun/accelerate,
mpirun, srun, or our own self-launch)."""

from __future__ import annotations

import os
import re
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from ds_realloc.utils.logging import get_logger

logger = get_logger(__name__)

_RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def _first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM nodelist such as `node[03-05,7],gpu1` -> `node03`."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        return nodelist
    stem, ranges = match.group(1), match.group(2)
    if not ranges:
        return stem
    return stem + ranges.split(",")[0].split("-")[0]


def slurm_env(environ: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed variables for a process started by `srun` (empty outside an srun step)."""
    if "SLURM_PROCID" not in environ or "SLURM_STEP_NUM_TASKS" not in environ or "RANK" in environ:
        return {}
    job_id = int(environ.get("SLURM_JOB_ID", "0"))
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or _first_slurm_host(environ.get("SLURM_STEP_NODELIST", "localhost")),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + job_id % 20000),
    }


def under_launcher(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a launcher started this process as one rank of a job (else the CLI launches itself)."""
    return any(var in environ for var in _RANK_VARS) or bool(slurm_env(environ))


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def comm_device() -> torch.device:
    """Where tensors must be for collectives: this rank's GPU under NCCL, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(timeout_s: float) -> tuple[int, int]:
    """Join the default process group (DeepSpeed's init, which also discovers MPI ranks); returns (rank, world)."""
    import deepspeed

    os.environ.update(slurm_env(os.environ))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=True, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


_PEER_FAILURES = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "gloo/transport",
                  "Timed out", "timed out", "NCCL communicator was aborted")


def is_peer_failure(error: BaseException) -> bool:
    """Whether a collective failed because another rank died or hung (gloo reports it as a plain
    RuntimeError from its transport; NCCL as a DistError)."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error) for s in _PEER_FAILURES)


def group_of(ranks) -> dist.ProcessGroup:
    """The process group of exactly these global ranks (the world group for all of them). Only its
    members call this (local synchronisation), and each group is created once per process."""
    key = tuple(sorted(ranks))
    if key == tuple(range(dist.get_world_size())):
        return dist.group.WORLD
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(list(key), use_local_synchronization=True)
    return _GROUPS[key]


class DataParallelMPU:
    """The `mpu` DeepSpeed asks for when a model is data parallel over a group of ranks (its mesh)
    and has no model parallelism inside the engine."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.ranks = dist.get_process_group_ranks(group)
        self._alone = group_of([dist.get_rank()])

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_world_size(self) -> int:
        return len(self.ranks)

    def get_data_parallel_rank(self) -> int:
        return self.ranks.index(dist.get_rank())

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.ranks)

    def get_model_parallel_group(self):
        return self._alone

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0
