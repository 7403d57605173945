"""Walking an MFC graph on a step's rows: the part of the runner that moves data and weights.

For each MFC, every rank (1) moves the rows of the MFC's inputs that its data-parallel group lacks
from the mesh that produced them, (2) for generate / inference calls, takes part in placing the
role's weights into the MFC's layout (as a sender, a receiver or both), and (3) if it belongs to
the MFC's mesh, runs the interface on its rows. MFCs on disjoint meshes therefore run at the same
time without a scheduler.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ds_realloc.algorithms.interface import Metrics, add_metric
from ds_realloc.comm.batches import exchange, route
from ds_realloc.dataflow.allocation import Allocation
from ds_realloc.dataflow.experiment import Interface, RunSettings
from ds_realloc.dataflow.mfc import MFC, MFCKind, dataset_keys
from ds_realloc.dataflow.roles import Role
from ds_realloc.dataflow.spans import CALL, MOVE, REALLOC, SpanRecorder
from ds_realloc.engine.zero_inference import ZeroInferenceCall
from ds_realloc.models.inference import InferenceCall

ROW, STEP, VALID = "row", "step", "valid"  # keys of every MFC's batch besides its inputs
Store = dict[str, dict[int, Any]]  # key -> row -> value, the rows this rank holds


def new_store(sample_key: str, samples: list, per_sample: int, step: int, valid: int | None = None) -> Store:
    """Rows of dataset samples (`per_sample` rows each, the first `valid` of them real); every rank
    holds the dataset keys of every row."""
    rows = len(samples) * per_sample
    valid = rows if valid is None else valid
    return {sample_key: {r: samples[r // per_sample] for r in range(rows)}, ROW: {r: r for r in range(rows)},
            STEP: {r: step for r in range(rows)}, VALID: {r: r < valid for r in range(rows)}}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class Walker:
    rank: int
    settings: RunSettings
    roles: dict[str, Role]
    allocations: dict[str, Allocation]
    zero3_inference: bool  # engine.inference=zero3: generate / inference on the role's own engine
    doing: str = "start-up"  # what this rank is busy with, for the error when a peer dies
    spans: SpanRecorder | None = None  # the measured timeline of training steps (None: not recorded)

    def _span(self, mfc: MFC, kind: str, start: float, evaluating: bool) -> None:
        if self.spans is not None and not evaluating:
            self.spans.add(mfc.name, kind, start, self.spans.now())

    def _now(self) -> float:
        return self.spans.now() if self.spans is not None else 0.0

    @contextlib.contextmanager
    def _weights(self, mfc: MFC) -> Iterator[tuple[InferenceCall | ZeroInferenceCall | None, dict[str, float]]]:
        """The role's weights placed into the MFC's layout for the call, with the move's metrics (every
        rank takes part). With `engine.inference=zero3` (DeepSpeed-Chat's mechanism, the baseline)
        nothing moves: the call runs on the role's own engine; this is the one place that switch is read."""
        role = self.roles.get(mfc.role)
        if role is None:
            yield None, {}
            return
        if self.zero3_inference:
            yield (ZeroInferenceCall(role.module, role.ds_engine) if role.module is not None else None), {}
            return
        allocation = self.allocations[mfc.name]
        kept = None if role.spec.trainable or role.spec.offload else role.version  # frozen, resident: keep
        with role.hybrid.placed(role.hybrid.layout(allocation.mesh, allocation.strategy), kept) as placement:
            yield (InferenceCall(placement.model) if placement.model is not None else None), {
                f"realloc/{mfc.name}_s": placement.seconds,
                f"realloc/{mfc.name}_recv_bytes": float(placement.stats.received_elements * role.hybrid.dtype.itemsize)}

    @contextlib.contextmanager
    def _train_states_offloaded(self, mfc: MFC) -> Iterator[None]:
        """With `rollout.offload_train_states`, this rank's training engines keep only their bf16/fp16
        partitions on the device while a generate MFC runs (the KV cache gets the memory)."""
        if mfc.kind is not MFCKind.GENERATE or not self.settings.offload_train_states:
            yield
            return
        engines = [role.engine for role in self.roles.values() if role.engine is not None]
        from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum

        states = (OffloadStateTypeEnum.optim_states, OffloadStateTypeEnum.hp_params, OffloadStateTypeEnum.lp_grads,
                  OffloadStateTypeEnum.contiguous_grad_buffer)
        for engine in engines:
            engine.offload_states(include=states)
        try:
            yield
        finally:
            for engine in engines:
                engine.reload_states()

    def route_inputs(self, mfc: MFC, store: Store, producers: dict[str, str | None], rows: int) -> None:
        """Move the MFC's input rows from the meshes that produced them to its data-parallel groups."""
        split = self.allocations[mfc.name].split(rows)
        for producer in sorted({producers[k] for k in mfc.input_keys if producers.get(k)}):
            keys = tuple(k for k in mfc.input_keys if producers[k] == producer)
            exchange(route(self.allocations[producer].split(rows), split), store, keys, store)

    def run_mfc(self, mfc: MFC, store: Store, rows: int, interface: Interface,
                evaluating: bool = False) -> tuple[Metrics, dict[str, float]]:
        allocation = self.allocations[mfc.name]
        split = allocation.split(rows)
        metrics: Metrics = {}
        placing = self._now()
        with contextlib.nullcontext((None, {})) if mfc.kind.on_engine else self._weights(mfc) as (call, timing):
            if timing:
                self._span(mfc, REALLOC, placing, evaluating)
            if self.rank in allocation.mesh:
                calling = self._now()
                begin = time.perf_counter()
                mine = list(split.rows_of(self.rank))
                batch = {key: [store[key][r] for r in mine] for key in (*mfc.input_keys, ROW, STEP, VALID)}
                engine = self.roles[mfc.role].engine if mfc.kind.on_engine else None
                outputs = {}
                if mfc.kind is MFCKind.TRAIN and evaluating:
                    metrics = interface.evaluate(engine, batch)
                elif mfc.kind is MFCKind.TRAIN:
                    metrics = interface.train_step(engine, batch)
                elif mfc.kind is MFCKind.SCORE:
                    with torch.no_grad():
                        outputs = interface.inference(engine, batch)
                else:
                    with self._train_states_offloaded(mfc):
                        outputs = interface.inference(call, batch)
                for key, values in outputs.items():
                    store.setdefault(key, {}).update(zip(mine, values))
                _sync()
                timing = {**timing, f"time/{mfc.name}_s": time.perf_counter() - begin}
                self._span(mfc, CALL, calling, evaluating)
                if split.groups[split.group_of(self.rank)][0] != self.rank:
                    metrics = {}  # the tensor-parallel ranks of a group report once
        if mfc.kind is MFCKind.TRAIN and not evaluating:
            self.roles[mfc.role].version += 1  # on every rank: the role's weights changed
        return metrics, timing

    def walk(self, mfcs: list[MFC], store: Store, rows: int, interfaces: dict[str, Interface], when: str,
             evaluating: bool = False) -> tuple[Metrics, dict[str, float]]:
        """Run MFCs on a step's rows, wave by wave: a wave is every MFC whose inputs exist. A wave's
        inputs all move before any of its MFCs runs, so MFCs of one wave on disjoint meshes (PPO's
        actor and critic training) run at the same time; metrics prefixed by role, timings by MFC."""
        producers: dict[str, str | None] = {k: None for k in dataset_keys(mfcs)}
        metrics: Metrics = {}
        timings: dict[str, float] = {}
        pending = list(mfcs)
        while pending:
            wave = [m for m in pending if set(m.input_keys) <= producers.keys()]
            for mfc in wave:
                self.doing = f"moving the inputs of {mfc.name} ({when})"
                moving = self._now()
                self.route_inputs(mfc, store, producers, rows)
                if any(producers.get(k) for k in mfc.input_keys):
                    self._span(mfc, MOVE, moving, evaluating)
            for mfc in wave:
                self.doing = f"{mfc.name} ({when})"
                mfc_metrics, timing = self.run_mfc(mfc, store, rows, interfaces[mfc.name], evaluating)
                prefix = f"eval/{mfc.role}/" if evaluating else f"{mfc.role}/"
                for name, value in mfc_metrics.items():
                    add_metric(metrics, name if "/" in name else prefix + name, *value)
                timings.update(timing)
            producers.update({key: mfc.name for mfc in wave for key in mfc.output_keys})
            pending = [m for m in pending if m not in wave]
        return metrics, timings
