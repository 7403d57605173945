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


_LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                    "SLURM_NTASKS_PER_NODE")  # torchrun / accelerate, deepspeed, Open MPI, MPICH, SLURM


def read_hostfile(path: str | os.PathLike) -> list[int]:
    """Slots per host of a DeepSpeed / MPI hostfile (`<host> slots=<n>` per line, `#` comments)."""
    from ds_realloc.utils.errors import ConfigError

    slots = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise ConfigError(f"launch.hostfile: cannot read {path}: {e.strerror}") from None
    for number, line in enumerate(lines, 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"\S+\s+slots\s*=\s*(\d+)", line)
        if not match or int(match.group(1)) < 1:
            raise ConfigError(f"{path}:{number}: expected '<hostname> slots=<processes>', got '{line}'")
        slots.append(int(match.group(1)))
    if not slots:
        raise ConfigError(f"launch.hostfile: {path} names no host")
    return slots


def slots_per_host(world: int, hostfile: str = "", environ: Mapping[str, str] = os.environ) -> list[int] | None:
    """Processes per host, for hostfile-relative meshes (`node1:0-3`): from the hostfile when given, else
    from the launcher's local world size (hosts of equal size), else one host when we launch the job
    ourselves; None when a launcher runs the job and says nothing about its hosts."""
    if hostfile:
        return read_hostfile(hostfile)
    for var in _LOCAL_SIZE_VARS:
        value = environ.get(var, "").split("(")[0]  # SLURM writes e.g. "4(x2)"
        if value.isdigit() and int(value) > 0 and world % int(value) == 0:
            return [int(value)] * (world // int(value))
    return None if under_launcher(environ) else [world]


COMMAND_START_VAR = "DS_REALLOC_COMMAND_START"


def command_start_time(environ: Mapping[str, str] = os.environ) -> float:
    """When the user's command started (time.time()): the self-launching CLI records it for its ranks;
    under a launcher, this process's own start."""
    if environ.get(COMMAND_START_VAR):
        return float(environ[COMMAND_START_VAR])
    import psutil

    return psutil.Process().create_time()


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
        _unlink_shm_segment()
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    """Leave the job cleanly once this rank's work is done: wait for every rank, then destroy every
    process group. A gloo process that exits with its groups alive can abort at interpreter teardown
    ("terminate called without an active exception", SIGABRT), when gloo's worker threads release
    work objects after Python is gone (pytorch/pytorch#190489). Only for the success path: on a failure
    the rank exits non-zero without waiting, and the launcher stops the others."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()  # with no argument: the default group and every group made from it
    _GROUPS.clear()


def shm_all_reduce_started() -> bool:
    """Whether DeepSpeed's backend started its shared-memory all-reduce over the whole job: it built
    the op and every rank is on one host (its own test, LOCAL_SIZE == world; the same on every rank)."""
    from deepspeed.comm import comm as ds_comm

    return (dist.is_initialized() and os.environ.get("LOCAL_SIZE") == str(dist.get_world_size())
            and getattr(ds_comm.cdb, "shm_comm_op", None) is not None)


def _unlink_shm_segment() -> None:
    """Remove the name of this rank's /dev/shm segment of DeepSpeed's shared-memory all-reduce (made
    when DeepSpeed's backend starts with every rank on one host) once every rank has mapped every
    segment: DeepSpeed never unlinks them, so each job would leave ~67 MB per rank behind until the
    host runs out of memory. The mappings stay valid until the processes exit."""
    if not shm_all_reduce_started():
        return
    dist.barrier()  # every rank's DeepSpeed start (which maps the others' segments) is over
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_" \
           f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}"
    try:
        os.unlink(f"/dev/shm/{name}")
    except FileNotFoundError:
        pass


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
