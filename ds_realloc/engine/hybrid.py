"""The hybrid engine: a ZeRO-3 model trains as usual and runs inference on tensor-parallel layouts.

`with hybrid.placed(layout, version) as placement:` reallocates the live ZeRO-3 partitions (read in
place, also when offloaded) into a data x tensor parallel layout on any ranks - the same ranks, a
subset, or others - and yields a `Placement` on every rank that takes part (sender, receiver or
both): this rank's inference model (None off the layout) and what the move cost. On exit the copy
is freed, or kept while the weights are unchanged: `version` names the weights (e.g. how many
training steps the model has had) and must be the same on every participating rank, since ranks
that only receive cannot see the optimizer. `generate`, `logprobs` and `values` are one call each
inside a placement. Training is untouched DeepSpeed.

Every rank of the source mesh and of the destination layout calls the same method (SPMD); ranks
outside the destination get None. A data-parallel destination splits the work by the caller:
each tensor-parallel group passes its own prompts (the same on all of its ranks).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ds_realloc.comm.realloc import (KeptWeights, ReallocStats, check_zero3_layout, reallocate, shaped,
                                     zero3_sources)
from ds_realloc.layout.layout import Layout
from ds_realloc.layout.mesh import DeviceMesh, Strategy
from ds_realloc.layout.model import model_spec
from ds_realloc.layout.plan import ReallocPlan
from ds_realloc.models.generate import Generation, GenerationConfig
from ds_realloc.models.inference import InferenceCall, InferenceModel, inference_model, parallel_groups
from ds_realloc.models.value_head import hf_model_of
from ds_realloc.utils.dist import comm_device
from ds_realloc.utils.errors import ConfigError


def replica_sources(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole parameters of a replicated model (ZeRO stages 0-2, or a frozen copy), flat, in place."""
    return {name: param.data.view(-1) for name, param in model.named_parameters()}


@dataclass
class Placement:
    """The weights of a model placed into a layout, as one rank sees it."""

    model: InferenceModel | None  # this rank's shard of the layout; None on ranks outside it
    group: tuple[int, ...]  # the ranks of this rank's tensor-parallel group, in tensor-parallel order
    stats: ReallocStats  # what this rank moved (nothing when a kept copy was current)
    seconds: float  # wall time of the move on this rank


class HybridEngine:
    def __init__(self, module: nn.Module | None, hf_config, value_head: bool, src_mesh: DeviceMesh,
                 dtype: torch.dtype, zero3: bool = True):
        """`module`: the model (a DeepSpeed engine's `.module`) on the ranks of `src_mesh`, None elsewhere;
        with `zero3` its ZeRO-3 partitions are the source, else every source rank holds whole parameters."""
        self.module = hf_model_of(module) if module is not None else None
        self.config = hf_config
        self.model = model_spec(hf_config, value_head=value_head)
        self.zero3 = zero3
        self.src = Layout(self.model, src_mesh, Strategy(dp=src_mesh.size, zero3=zero3))
        self.dtype, self.device = dtype, comm_device()
        self._plans: dict[object, ReallocPlan] = {}  # by destination layout (or a blend target)
        self._kept: KeptWeights | None = None
        self._checked = False

    @classmethod
    def of_engine(cls, engine, hf_config, value_head: bool) -> "HybridEngine":
        """Around a DeepSpeed training engine; weights change with each optimizer step."""
        from ds_realloc.engine.ds_config import torch_dtype, zero_stage

        mpu = engine.mpu
        mesh = DeviceMesh(tuple(mpu.get_data_parallel_group_ranks()) if mpu is not None else
                          tuple(range(dist.get_world_size())))
        return cls(engine.module, hf_config, value_head, mesh, torch_dtype(engine.config),
                   zero3=zero_stage(engine.config) == 3)

    def layout(self, mesh: DeviceMesh, strategy: Strategy) -> Layout:
        """An inference layout (fused q/k/v and gate/up buffers) of this model."""
        if strategy.zero3 or strategy.pp != 1:
            raise ConfigError(f"inference runs on d<dp>t<tp> layouts, not {strategy}")
        return Layout(self.model, mesh, strategy, fused=True)

    def plan(self, layout: Layout) -> ReallocPlan:
        if layout not in self._plans:
            self._plans[layout] = ReallocPlan.build(self.model, self.src, layout)
        return self._plans[layout]

    def _weights(self, layout: Layout, version: object | None,
                 stats: ReallocStats) -> tuple[Layout, dict[str, torch.Tensor]]:
        plan = self.plan(layout)
        if self._kept is not None and self._kept.current(plan.dst, version):
            return plan.dst, self._kept.buffers
        rank = dist.get_rank()
        if self.module is not None and self.zero3 and not self._checked:
            check_zero3_layout(self.module, self.src, rank)
            self._checked = True
        buffers = reallocate(plan, self.sources(), self.dtype, self.device, stats=stats)
        self._kept = KeptWeights(plan.dst, version, buffers) if version is not None else None
        return plan.dst, buffers

    def sources(self) -> dict[str, torch.Tensor]:
        """This rank's part of the model in place, flat by parameter name: its ZeRO-3 partitions, or
        whole parameters of a replica; empty off the model's mesh."""
        if self.module is None:
            return {}
        return zero3_sources(self.module) if self.zero3 else replica_sources(self.module)

    @contextlib.contextmanager
    def placed(self, layout: Layout, version: object | None = None) -> Iterator[Placement]:
        """This model's weights in `layout` for the `with` block. Every rank of the source mesh and of
        the layout enters it; with a `version`, the copy outlives the block and later placements of the
        same layout and version reuse it, else it is freed on exit."""
        start, stats = time.perf_counter(), ReallocStats()
        placed, buffers = self._weights(layout, version, stats)
        placement = Placement(*self._model(placed, buffers), stats, time.perf_counter() - start)
        del buffers
        try:
            yield placement
        finally:
            placement.model = None  # the block's reference to the copy (a kept copy stays in self._kept)

    def _model(self, placed: Layout, buffers: dict[str, torch.Tensor]) -> tuple[InferenceModel | None, tuple[int, ...]]:
        rank = dist.get_rank()
        if rank not in placed.ranks:
            return None, ()
        tp, ep = parallel_groups(placed, rank)
        return inference_model(self.config, shaped(placed, rank, buffers), tp, ep), placed.tensor_ranks(rank)

    def blend_into(self, other: "HybridEngine", ema: float) -> ReallocStats:
        """other <- ema * self + (1 - ema) * other, in place in the other model's own partitions (ZeRO-3
        or replicas), moved by reallocation from this model's: a reference-model EMA of the actor.
        Every rank of either mesh calls it; the other model's kept inference copy is dropped."""
        if self.model != other.model:
            raise ConfigError("ref.ema: the reference model must have the actor's architecture and shapes")
        key = ("blend", other.src)
        if key not in self._plans:
            self._plans[key] = ReallocPlan.build(self.model, self.src, other.src)
        stats = ReallocStats()
        reallocate(self._plans[key], self.sources(), self.dtype, self.device, targets=other.sources(), ema=ema,
                   stats=stats)
        other.release()
        return stats

    def release(self) -> None:
        """Drop a kept inference copy (the next call reallocates)."""
        self._kept = None

    # -- the calls -------------------------------------------------------------------------------

    def generate(self, layout: Layout, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
                 eos_token_ids: Sequence[int], pad_token_id: int, version: object | None = None) -> Generation | None:
        with self.placed(layout, version) as placement:
            return None if placement.model is None else InferenceCall(placement.model).generate(
                prompts, cfg, eos_token_ids, pad_token_id)

    def logprobs(self, layout: Layout, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 version: object | None = None) -> torch.Tensor | None:
        """Token log-probs [B, T-1] of a batch (reference / actor inference)."""
        with self.placed(layout, version) as placement:
            return None if placement.model is None else InferenceCall(placement.model).logprobs(input_ids, attention_mask)

    def values(self, layout: Layout, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               version: object | None = None) -> torch.Tensor | None:
        """Per-token values [B, T] of a critic / reward model."""
        with self.placed(layout, version) as placement:
            return None if placement.model is None else InferenceCall(placement.model).values(input_ids, attention_mask)
