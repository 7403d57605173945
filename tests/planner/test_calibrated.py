"""Measured call times: the four-number fits, their JSON, and the cost terms that use them."""

import dataclasses

import pytest
from transformers import LlamaConfig

from ds_realloc.dataflow.allocation import Allocation
from ds_realloc.dataflow.mfc import MFC, MFCKind
from ds_realloc.layout.mesh import DeviceMesh, Strategy
from ds_realloc.layout.model import model_spec
from ds_realloc.planner.calibrated import Fit, ModelTable, signature, stage_key, table_for
from ds_realloc.planner.cost import ModelShape
from ds_realloc.planner.estimate import RoleModel, TrainSetting, Workload, call_seconds
from ds_realloc.planner.profile import DeviceProfile, Link, _from_json
from ds_realloc.utils.errors import ConfigError

CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=10, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256)
SHAPE = ModelShape.of(CONFIG)
ROLE = RoleModel(model_spec(CONFIG), SHAPE, trainable=True)
LINK = Link(1e9, 1e-4)


def _profile(fits: dict) -> DeviceProfile:
    table = ModelTable("bf16", {k: Fit(*v) for k, v in fits.items()}).to_json()
    return DeviceProfile("fake", 10**10, {"bf16": 1e12}, 1e11, LINK, LINK, 1e9, 1e8, 2,
                         models={signature(SHAPE, "bf16"): table})


def test_a_fit_through_four_measurements_recovers_its_coefficients():
    truth = Fit(0.5, 0.01, 0.2, 0.003)
    points = {(layers, n): truth.at(layers, n) for layers in (1, 3) for n in (100, 400)}
    fit = Fit.of((1, 3), (100, 400), points)
    assert fit.to_json() == pytest.approx(truth.to_json())
    assert fit.at(30, 1000) == pytest.approx(0.5 + 10 + 30 * (0.2 + 3))
    assert Fit(-1.0, 0, 0, 0).at(5, 5) == 0.0  # never negative


def test_tables_round_trip_and_bad_tables_name_the_field(tmp_path):
    profile = _profile({"decode_t1": (1, 2, 3, 4)})
    again = _from_json(profile.to_json(), "p.json")
    assert table_for(again, SHAPE, "bf16").get("decode_t1") == Fit(1, 2, 3, 4)
    assert table_for(again, SHAPE, "fp32") is None  # another dtype was not measured
    with pytest.raises(ConfigError, match=r"p.json: field 'models.x' must hold 'dtype' and 'fits'"):
        _from_json(dict(profile.to_json(), models={"x": {"dtype": "bf16", "fits": {"decode_t1": [1, 2]}}}), "p.json")


def test_stage_one_and_two_stand_for_each_other_and_nothing_else_does():
    fits = {"train_lm_z2": Fit(0, 0, 0, 0), "train_lm_z3": Fit(0, 0, 0, 0)}
    assert stage_key(1, fits, "lm", "train") == "train_lm_z2" and stage_key(3, fits, "lm", "train") == "train_lm_z3"
    assert stage_key(0, fits, "lm", "train") is None and stage_key(1, fits, "value", "train") is None


def test_calls_take_the_measured_times_by_hand():
    profile = _profile({"decode_t1": (0.01, 0.001, 0.002, 0.0001), "prefill_t1": (0.02, 1e-5, 0.003, 1e-6),
                        "score_lm_t1": (0.1, 1e-4, 0.01, 1e-5), "train_lm_z3": (0.3, 1e-4, 0.02, 1e-4),
                        "optimizer_lm_z3": (0.07, 0, 0.004, 0), "engine_score_lm_z3": (0.01, 1e-5, 0.005, 1e-5)})
    work = Workload(rows=16, prompt_len=50, new_tokens=10, dtype="bf16")
    gen = MFC("actor_gen", "actor", MFCKind.GENERATE, ("prompt",), ("completion",))
    d2 = Allocation(gen, DeviceMesh((0, 1)), Strategy(dp=2))
    rows = 8
    decode = 0.01 + 0.001 * rows + 10 * (0.002 + 0.0001 * rows)
    prefill = 0.02 + 1e-5 * rows * 50 + 10 * (0.003 + 1e-6 * rows * 50)
    assert call_seconds(gen, d2, ROLE, work, None, profile) == pytest.approx(prefill + 9 * decode)
    ref = MFC("ref_inf", "actor", MFCKind.INFERENCE, ("prompt",), ("ref",))
    tokens = rows * 60
    assert call_seconds(ref, Allocation(ref, DeviceMesh((0, 1)), Strategy(dp=2)), ROLE, work, None, profile) == \
        pytest.approx(0.1 + 1e-4 * tokens + 10 * (0.01 + 1e-5 * tokens))
    train = MFC("actor_train", "actor", MFCKind.TRAIN, ("prompt",))
    one = Allocation(train, DeviceMesh((0,)), Strategy(dp=1, zero3=True))
    micro = 0.3 + 1e-4 * 240 + 10 * (0.02 + 1e-4 * 240)  # micro-batches of 4 rows x 60 tokens
    optimizer = 0.07 + 10 * 0.004
    assert call_seconds(train, one, ROLE, work, TrainSetting(3, 4), profile) == pytest.approx(4 * micro + optimizer)
    # on two ranks: half the rows each, its share of the optimizer step, ZeRO-3's gathers over the link
    two = Allocation(train, DeviceMesh((0, 1)), Strategy(dp=2, zero3=True))
    from ds_realloc.planner import cost

    traffic = cost.zero_traffic_s(SHAPE, 3, 2, 2, LINK, "bf16")
    assert call_seconds(train, two, ROLE, work, TrainSetting(3, 4), profile) == \
        pytest.approx(2 * micro + traffic + optimizer / 2)
    # a stage the profile did not time falls back to the roofline, and the search leaves it out
    from ds_realloc.planner.search import measured_stages

    assert measured_stages(profile, ROLE, "bf16") == (3,)
    assert call_seconds(train, two, ROLE, work, TrainSetting(0, 4), profile) != \
        call_seconds(train, two, ROLE, dataclasses.replace(work), TrainSetting(3, 4), profile)


def test_a_training_micro_batch_holds_what_the_profile_measured():
    from ds_realloc.planner import cost
    from ds_realloc.planner.calibrated import train_transient_bytes
    from ds_realloc.planner.estimate import transient_bytes

    profile = _profile({"memory_lm_z2": (1000, 10, 100, 1)})
    table = table_for(profile, SHAPE, "bf16")
    assert train_transient_bytes(table, SHAPE, "lm", 1, 240) == pytest.approx(1000 + 2400 + 10 * (100 + 240))
    assert train_transient_bytes(table, SHAPE, "lm", 3, 240) is None  # stage 3 not measured
    work = Workload(rows=16, prompt_len=50, new_tokens=10, dtype="bf16")
    train = MFC("actor_train", "actor", MFCKind.TRAIN, ("prompt",))
    two = Allocation(train, DeviceMesh((0, 1)), Strategy(dp=2, zero3=False))
    # micro-batches of 4 rows x 60 tokens (8 rows per rank)
    assert transient_bytes(train, two, ROLE, work, TrainSetting(2, 4), profile=profile) == 1000 + 2400 + 10 * 340
    # without a measurement, or with offload (not profiled): the analytic terms, less the resident bucket
    analytic = cost.train_peak_bytes(SHAPE, 2, 2, 4, 60, True, False, "bf16") - \
        cost.train_state_bytes(SHAPE, 2, 2, True, False, "bf16") - cost.gradient_bucket_bytes(SHAPE, 2, "bf16")
    assert transient_bytes(train, two, ROLE, work, TrainSetting(2, 4, offload_optimizer=True), profile=profile) == \
        analytic
