"""DeepSpeed behaviour that assumes one engine owns the whole world, and what we do about it; and the
DeepSpeed internals ds_realloc reads or patches, checked before they are used.

ZeRO-3's parameter coordinator checks, when it finishes recording its first trace, that every rank
of the *world* recorded the same module and parameter order (`assert_ints_same_as_other_ranks`:
two broadcasts from global rank 0). An engine on a sub-mesh (the actor on ranks 0-1 while the
critic trains on 2-3) then pairs its broadcasts with another engine's ranks and fails or hangs.
The ranks of one engine run the same code here (SPMD), so the check is reduced to a local one.
Barriers and the global `groups.mpu` are scoped per engine by `scoped_to`, for the duration of a
build or a checkpoint. This module is the one place ds_realloc changes DeepSpeed, and importing it
changes nothing: `patch_deepspeed()` applies the patch once, called by `engine.factory` before it
builds an engine; `scoped_to` swaps and restores.
"""

from __future__ import annotations

import contextlib
import importlib
from types import SimpleNamespace
from typing import Iterator

from ds_realloc.utils.errors import UserError
from ds_realloc.utils.logging import get_logger

logger = get_logger(__name__)

TESTED_WITH = "deepspeed 0.19.8"


class DeepSpeedInternalChanged(UserError):
    """A DeepSpeed internal that ds_realloc relies on is missing or behaves differently."""


# (module, attribute, what ds_realloc does with it)
GUARDED = (
    ("deepspeed.runtime.zero.partitioned_param_coordinator", "assert_ints_same_as_other_ranks",
     "replaced by a rank-local check so ZeRO-3 engines on disjoint sub-meshes do not pair broadcasts"),
    ("deepspeed.comm", "barrier", "scoped to an engine's process group while it is built or checkpointed"),
    ("deepspeed.utils.groups", "mpu", "set to an engine's own mpu while it is built or checkpointed"),
    ("deepspeed.runtime.zero.partition_parameters", "Init",
     "ZeRO-3 partitions are read in place from param.ds_tensor (flat range [i*P, (i+1)*P), P = ceil(N/D))"),
)


def _internal_changed(name: str, why: str, problem: str) -> DeepSpeedInternalChanged:
    import deepspeed

    return DeepSpeedInternalChanged(
        f"DeepSpeed internal {name} {problem}; ds_realloc needs it ({why}). It was tested with {TESTED_WITH}, "
        f"this is deepspeed {deepspeed.__version__}: install the version in requirements.txt")


def check_internals() -> None:
    """Raise DeepSpeedInternalChanged naming the first guarded internal that is gone or changed."""
    for module_name, attribute, why in GUARDED:
        name = f"{module_name}.{attribute}"
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise _internal_changed(name, why, f"cannot be imported ({e})") from None
        if not hasattr(module, attribute):
            raise _internal_changed(name, why, "no longer exists")
    init = importlib.import_module("deepspeed.runtime.zero.partition_parameters").Init
    padding = getattr(init, "_padding_size", None)
    if padding is None:
        raise _internal_changed("deepspeed.runtime.zero.partition_parameters.Init._padding_size", GUARDED[3][2],
                                "no longer exists")
    # the partition layout: N = 10 over D = 4 ranks pads to 12, so every partition holds P = ceil(10 / 4) = 3
    fake_init = SimpleNamespace(_partition_world_size=lambda param: 4)
    if padding(fake_init, SimpleNamespace(ds_numel=10)) != 2:
        raise _internal_changed("deepspeed.runtime.zero.partition_parameters.Init._padding_size", GUARDED[3][2],
                                "pads differently (10 elements over 4 ranks should pad by 2)")


_PATCHED = False


def _same_on_this_rank(ints: list[int]) -> None:
    """The world-wide order check, reduced to what a rank can check alone."""
    if any(not isinstance(i, int) for i in ints):
        raise RuntimeError(f"ZeRO-3 trace holds non-integer ids: {ints[:5]}")


def patch_deepspeed() -> None:
    """Check the guarded internals, then scope ZeRO-3's world-wide trace check (once per process)."""
    global _PATCHED
    if _PATCHED:
        return
    check_internals()
    from deepspeed.runtime.zero import partitioned_param_coordinator

    partitioned_param_coordinator.assert_ints_same_as_other_ranks = _same_on_this_rank
    _PATCHED = True


@contextlib.contextmanager
def scoped_to(mpu) -> Iterator[None]:
    """Run DeepSpeed code that assumes it owns the world on the engine's group instead: ZeRO-3
    construction and checkpointing call group-less barriers, and DeepSpeed reads a process-global
    `groups.mpu` that the last engine built overwrote. Engines on disjoint meshes then never wait
    for each other's ranks."""
    from deepspeed import comm
    from deepspeed.utils import groups

    barrier, previous = comm.barrier, groups.mpu

    def group_barrier(group=None, **kwargs):
        return barrier(group=group if group is not None else mpu.get_data_parallel_group(), **kwargs)

    comm.barrier, groups.mpu = group_barrier, mpu
    try:
        yield
    finally:
        comm.barrier, groups.mpu = barrier, previous
