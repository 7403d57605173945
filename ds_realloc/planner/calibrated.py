"""Measured call times: the cost terms of a model that `ds-realloc profile model.path=...` timed on this
machine, in place of the roofline.

The profile runs our own code paths (generation and scoring on the inference layouts, DeepSpeed
engines' forward / backward / optimizer step by ZeRO stage) on copies of the model with 1 and 4
transformer layers and a few batch sizes, on every rank at once (as the runner's calls share the
host), each timing the median of its repeats, and keeps per operation a fixed part and a per-layer
part, each piecewise linear in the batch size `n` (rows for a decode step, tokens otherwise) through
the sizes it measured:

    seconds(layers, n) = fixed(n) + layers * layer(n)

so the real model's time is extrapolated in its layer count and interpolated in its batch size (a
CPU layer's time per token falls as the batch grows: one straight line through two sizes put a
per-layer constant under every small micro-batch). An operation under the LM head and under the value
head runs the same layers, so the two share one per-layer part, fitted by least squares over both
(`shared_layer_fits`).
Operation keys: `decode_t<tp>` / `prefill_t<tp>` (generation), `score_<head>_t<tp>` (an inference
forward, head `lm` = log-probs or `value`), `train_<head>_z<stage>` (an accumulating micro-batch's
forward and backward), `optimizer_<head>_z<stage>` (what a step's last micro-batch adds once per step: the
boundary's gradient reduction and the optimizer step), `engine_score_<head>_z<stage>`
(an engine's no-grad forward: the recompute of old log-probs / values), each also of an engine
data-parallel over all the profile's ranks with the suffix `_d<ranks>` (its ZeRO collectives timed
with it), and `memory_<head>_z<stage>` in bytes (what a steady training step of two micro-batches holds
above the level before it).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Mapping, Sequence

from ds_realloc.planner.cost import ModelShape
from ds_realloc.planner.profile import DeviceProfile


@dataclass(frozen=True)
class Fit:
    """`fixed(n) + layers * layer(n)`, both through their values at the measured sizes `ns` (increasing),
    linear between them and along the end segments beyond them."""

    ns: tuple[float, ...]
    fixed: tuple[float, ...]
    layer: tuple[float, ...]

    def at(self, layers: int, n: float) -> float:
        return max(0.0, _piecewise(self.ns, self.fixed, n) + layers * _piecewise(self.ns, self.layer, n))

    def to_json(self) -> dict:
        return {"n": list(self.ns), "fixed": list(self.fixed), "layer": list(self.layer)}

    @staticmethod
    def from_json(data: Mapping) -> "Fit":
        return Fit(*(tuple(map(float, data[k])) for k in ("n", "fixed", "layer")))


def _piecewise(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    i = bisect.bisect_right(xs, x, 1, len(xs) - 1)  # the segment [xs[i-1], xs[i]], the end ones extended
    return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])


def shared_layer_fits(points: Mapping[str, Mapping[tuple[int, float], float]]) -> dict[str, Fit]:
    """Fits of operations that run the same transformer layers under different fixed parts (the LM head
    and the value head): at every measured size, each its own fixed part and one per-layer part for all,
    by least squares over every `points[op][(layers, n)]` (every operation measured at the same sizes,
    at two layer counts at least). The per-layer part is what extrapolates to the real model's depth (1
    and 4 layers to 30 multiply its noise 10-fold), so it is measured on every operation that has it."""
    import torch

    ops = sorted(points)
    ns = sorted({n for op in ops for _, n in points[op]})
    fixed: dict[str, list[float]] = {op: [] for op in ops}
    layer = []
    for n in ns:
        rows, targets = [], []
        for i, op in enumerate(ops):
            for layers in sorted(count for count, size in points[op] if size == n):
                rows.append([1.0 if j == i else 0.0 for j in range(len(ops))] + [float(layers)])
                targets.append([points[op][(layers, n)]])
        solution = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64),
                                      torch.tensor(targets, dtype=torch.float64), driver="gelsd").solution[:, 0]
        for i, op in enumerate(ops):
            fixed[op].append(float(solution[i]))
        layer.append(float(solution[-1]))
    return {op: Fit(tuple(ns), tuple(fixed[op]), tuple(layer)) for op in ops}


def signature(shape: ModelShape, dtype: str) -> str:
    """What a table is keyed by: the shape of the model apart from its layer count, and the dtype."""
    return (f"h{shape.hidden}-i{shape.intermediate}-a{shape.heads}-kv{shape.kv_heads}-d{shape.head_dim}"
            f"-v{shape.vocab}-{dtype}")


@dataclass(frozen=True)
class ModelTable:
    """The measured operations of one model shape in one dtype."""

    dtype: str
    fits: Mapping[str, Fit]

    def get(self, key: str) -> Fit | None:
        return self.fits.get(key)

    @staticmethod
    def from_json(data: Mapping) -> "ModelTable":
        return ModelTable(str(data["dtype"]), {k: Fit.from_json(v) for k, v in data["fits"].items()})

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "fits": {k: f.to_json() for k, f in sorted(self.fits.items())}}


def table_for(profile: DeviceProfile, shape: ModelShape, dtype: str) -> ModelTable | None:
    """The measured calls of a model of this shape in `dtype` in a profile, None if never profiled."""
    data = profile.models.get(signature(shape, dtype))
    return None if data is None else ModelTable.from_json(data)


def stage_key(stage: int, fits: Mapping[str, Fit], head: str, kind: str, dp: int = 1) -> str | None:
    """The measured stage standing for `stage` on an engine data-parallel over `dp` ranks: itself, else
    1 <-> 2 (the closest: they differ in when the gradients are reduced into the optimizer's partitions,
    stage 2 at every micro-batch and stage 1 at the step's last; a profile times both by default)."""
    suffix = "" if dp == 1 else f"_d{dp}"
    for s in (stage, {1: 2, 2: 1}.get(stage)):
        if s is not None and f"{kind}_{head}_z{s}{suffix}" in fits:
            return f"{kind}_{head}_z{s}{suffix}"
    return None


def generate_s(table: ModelTable, shape: ModelShape, rows: int, prompt_len: int, new_tokens: int,
               tp: int) -> float | None:
    decode, prefill = table.get(f"decode_t{tp}"), table.get(f"prefill_t{tp}")
    if decode is None or prefill is None:
        return None
    return prefill.at(shape.layers, rows * prompt_len) + (new_tokens - 1) * decode.at(shape.layers, rows)


def score_s(table: ModelTable, shape: ModelShape, head: str, tokens: int, tp: int) -> float | None:
    fit = table.get(f"score_{head}_t{tp}")
    return None if fit is None else fit.at(shape.layers, tokens)


def engine_s(table: ModelTable, shape: ModelShape, head: str, stage: int, kind: str, tokens: int,
             dp: int = 1) -> float | None:
    """`kind` train (a micro-batch's forward + backward), engine_score (its no-grad forward) or optimizer,
    of an engine data-parallel over `dp` ranks (`tokens` per rank; None where that `dp` was not timed)."""
    key = stage_key(stage, table.fits, head, kind, dp)
    return None if key is None else table.fits[key].at(shape.layers, tokens)


def train_transient_bytes(table: ModelTable, shape: ModelShape, head: str, stage: int, tokens: int) -> float | None:
    """What a steady training micro-batch of `tokens` holds above its engine's persistent states (measured
    on one rank; stage 1 and 2 stand for each other)."""
    key = stage_key(stage, table.fits, head, "memory")
    return None if key is None else table.fits[key].at(shape.layers, tokens)
