"""Measured call times: the cost terms of a model that `ds-realloc profile model.path=...` timed on this
machine, in place of the roofline.

The profile runs our own code paths (generation and scoring on the inference layouts, DeepSpeed
engines' forward / backward / optimizer step by ZeRO stage) on copies of the model with 1 and 3
transformer layers and two batch sizes, on every rank at once (as the runner's calls share the
host), and keeps per operation four numbers: a fixed part and a per-layer part, each linear in the
batch size `n` (rows for a decode step, tokens otherwise):

    seconds(layers, n) = fixed + fixed_per_n * n + layers * (layer + layer_per_n * n)

so the real model's time is extrapolated in its layer count and interpolated in its batch size.
Operation keys: `decode_t<tp>` / `prefill_t<tp>` (generation), `score_<head>_t<tp>` (an inference
forward, head `lm` = log-probs or `value`), `train_<head>_z<stage>` (one micro-batch's forward and
backward), `optimizer_<head>_z<stage>` (one optimizer step at dp=1), `engine_score_<head>_z<stage>`
(an engine's no-grad forward: the recompute of old log-probs / values), and `memory_<head>_z<stage>`
in bytes (what a steady training micro-batch holds above the level before it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from ds_realloc.planner.cost import ModelShape
from ds_realloc.planner.profile import DeviceProfile


@dataclass(frozen=True)
class Fit:
    fixed: float
    fixed_per_n: float
    layer: float
    layer_per_n: float

    def at(self, layers: int, n: float) -> float:
        return max(0.0, self.fixed + self.fixed_per_n * n + layers * (self.layer + self.layer_per_n * n))

    @staticmethod
    def of(layers: Sequence[int], ns: Sequence[float], seconds: Mapping[tuple[int, float], float]) -> "Fit":
        """The fit through four measurements: `seconds[(layers, n)]` at two layer counts and two sizes."""
        (l1, l2), (n1, n2) = layers, ns

        def split(n: float) -> tuple[float, float]:
            per_layer = (seconds[(l2, n)] - seconds[(l1, n)]) / (l2 - l1)
            return seconds[(l1, n)] - l1 * per_layer, per_layer

        (fa, la), (fb, lb) = split(n1), split(n2)
        fixed_per_n, layer_per_n = (fb - fa) / (n2 - n1), (lb - la) / (n2 - n1)
        return Fit(fa - fixed_per_n * n1, fixed_per_n, la - layer_per_n * n1, layer_per_n)

    def to_json(self) -> list[float]:
        return [self.fixed, self.fixed_per_n, self.layer, self.layer_per_n]


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
        return ModelTable(str(data["dtype"]), {k: Fit(*map(float, v)) for k, v in data["fits"].items()})

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "fits": {k: f.to_json() for k, f in sorted(self.fits.items())}}


def table_for(profile: DeviceProfile, shape: ModelShape, dtype: str) -> ModelTable | None:
    """The measured calls of a model of this shape in `dtype` in a profile, None if never profiled."""
    data = profile.models.get(signature(shape, dtype))
    return None if data is None else ModelTable.from_json(data)


def stage_key(stage: int, fits: Mapping[str, Fit], head: str, kind: str) -> str | None:
    """The measured stage standing for `stage`: itself, else 1 <-> 2 (on one rank they compute the same:
    optimizer states and gradients partitioned over a group of one; they differ in collectives, which
    the link model adds)."""
    for s in (stage, {1: 2, 2: 1}.get(stage)):
        if s is not None and f"{kind}_{head}_z{s}" in fits:
            return f"{kind}_{head}_z{s}"
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


def engine_s(table: ModelTable, shape: ModelShape, head: str, stage: int, kind: str, tokens: int) -> float | None:
    """`kind` train (a micro-batch's forward + backward), engine_score (its no-grad forward) or optimizer."""
    key = stage_key(stage, table.fits, head, kind)
    return None if key is None else table.fits[key].at(shape.layers, tokens)


def train_transient_bytes(table: ModelTable, shape: ModelShape, head: str, stage: int, tokens: int) -> float | None:
    """What a steady training micro-batch of `tokens` holds above its engine's persistent states (measured
    on one rank; stage 1 and 2 stand for each other)."""
    key = stage_key(stage, table.fits, head, "memory")
    return None if key is None else table.fits[key].at(shape.layers, tokens)
