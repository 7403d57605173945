"""`ds-realloc profile model=...` times a model's calls on real ranks: every operation the cost model
reads, at both layer counts and sizes, for the layouts the model's heads allow."""

import math

from ds_realloc.models.presets import resolve_model_path
from ds_realloc.planner.calibrated import ModelTable, signature
from ds_realloc.planner.cost import ModelShape
from ds_realloc.planner.profile_config import ProfileConfig
from ds_realloc.planner.measure_calls import measure_model


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
    assert set(table.fits) == expected
    for name, fit in table.fits.items():
        seconds = fit.at(2, 32)
        assert math.isfinite(seconds) and seconds >= 0, name
    assert table.fits["train_lm_z3"].at(2, 32) > 0
    for kind in ("train_{}_z3", "optimizer_{}_z3", "engine_score_{}_z3", "score_{}_t1", "score_{}_t2"):
        lm, value = table.fits[kind.format("lm")], table.fits[kind.format("value")]  # the same layers: one cost
        assert lm.ns == value.ns == (12.0, 24.0) and lm.layer == value.layer, kind
    assert 0 < table.fits["memory_lm_z3"].at(3, 24)  # a micro-batch holds its activations and logits
