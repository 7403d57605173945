"""DeepSpeed behaviour that assumes one engine owns the whole world, and what we do about it.

ZeRO-3's parameter coordinator checks, when it finishes recording its first trace, that every rank
of the *world* recorded the same module and parameter order (`assert_ints_same_as_other_ranks`:
two broadcasts from global rank 0). An engine on a sub-mesh (the actor on ranks 0-1 while the
critic trains on 2-3) then pairs its broadcasts with another engine's ranks and fails or hangs.
The ranks of one engine run the same code here (SPMD), so the check is reduced to a local one.
Barriers and the global `groups.mpu` are scoped per engine by `engine.factory.scoped_to`.
"""

from __future__ import annotations

from deepspeed.runtime.zero import partitioned_param_coordinator

from ds_realloc.utils.logging import get_logger

logger = get_logger(__name__)


def _same_on_this_rank(ints: list[int]) -> None:
    """The world-wide order check, reduced to what a rank can check alone."""
    if any(not isinstance(i, int) for i in ints):
        raise RuntimeError(f"ZeRO-3 trace holds non-integer ids: {ints[:5]}")


partitioned_param_coordinator.assert_ints_same_as_other_ranks = _same_on_this_rank
