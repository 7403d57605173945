"""`ds-realloc profile model=...` times a model's calls on real ranks: every operation the cost model
reads, at both layer counts and sizes, for the layouts the model's heads allow."""

import math
import time

from ds_realloc.models.presets import resolve_model_path
from ds_realloc.planner.calibrated import ModelTable, signature
from ds_realloc.planner.cost import ModelShape
from ds_realloc.planner.profile_config import ProfileConfig
from ds_realloc.planner.measure_calls import _synchronised_median_s, after_warmup, measure_model
from ds_realloc.utils.spawn import run_ranks


def test_a_tiny_model_gets_a_table_of_every_operation():
    from transformers import AutoConfig

    path = resolve_model_path("tiny-llama")
    cfg = ProfileConfig(ranks=2, model="tiny-llama", repeats=1, rows=[1, 2], prompt_len=8, new_tokens=4, stages=[3],
                        dtype="fp32")
    models = measure_model(cfg, path)
    key = signature(ModelShape.of(AutoConfig.from_pretrained(path)), "fp32")
    assert list(models) == [key]
    table = ModelTable.from_json(models[key])
    expected = {f"{kind}_t{tp}" for kind in ("decode", "prefill", "score_lm", "score_value") for tp in (1, 2)}
    expected |= {f"{kind}_{head}_z3" for kind in ("train", "optimizer", "engine_score", "memory")
                 for head in ("lm", "value")}
    expected |= {f"{kind}_{head}_z3_d2" for kind in ("train", "optimizer", "engine_score") for head in ("lm", "value")}
    assert set(table.fits) == expected
    for name, fit in table.fits.items():
        seconds = fit.at(2, 32)
        assert math.isfinite(seconds) and seconds >= 0, name
    assert table.fits["train_lm_z3"].at(2, 32) > 0
    for kind in ("train_{}_z3", "optimizer_{}_z3", "engine_score_{}_z3", "train_{}_z3_d2", "score_{}_t1",
                 "score_{}_t2"):
        lm, value = table.fits[kind.format("lm")], table.fits[kind.format("value")]  # the same layers: one cost
        assert lm.ns == value.ns == (12.0, 24.0) and lm.layer == value.layer, kind
    assert 0 < table.fits["memory_lm_z3"].at(3, 24)  # a micro-batch holds its activations and logits


SLEEPS_S = {0: [0.01, 0.05, 0.30, 0.15], 1: [0.01, 0.01, 0.01, 0.01]}  # a warm-up, then 3 repeats


def _median_of_sleeps(rank: int, world: int) -> float:
    sleeps = iter(SLEEPS_S[rank])
    return _synchronised_median_s(lambda: time.sleep(next(sleeps)), repeats=3)


def test_a_call_counts_the_median_of_its_repeats_on_the_slowest_rank():
    # rank 0's repeats take 0.05, 0.30 and 0.15 s: the median 0.15 counts, not the fastest 0.05; rank 1
    # waits for rank 0 at each repeat's barrier (its median is about 0.05), and every rank gets the max
    results = run_ranks(_median_of_sleeps, 2, timeout=60)
    assert results[0] == results[1]
    assert 0.15 <= results[0] < 0.22


def test_warm_up_calls_run_and_are_left_out():
    calls = []
    assert after_warmup(lambda: calls.append(len(calls)) or len(calls), warmups=2, repeats=3) == [3, 4, 5]
    assert len(calls) == 5  # a new engine's first steps run (Adam's states, first-call costs), untimed
