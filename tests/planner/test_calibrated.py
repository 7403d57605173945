"""Measured call times: the piecewise-linear fits, their JSON, and the cost terms that use them."""

import dataclasses

import pytest
from transformers import LlamaConfig

from ds_realloc.dataflow.allocation import Allocation
from ds_realloc.dataflow.mfc import MFC, MFCKind
from ds_realloc.layout.mesh import DeviceMesh, Strategy
from ds_realloc.layout.model import model_spec
from ds_realloc.planner.calibrated import Fit, ModelTable, shared_layer_fits, signature, stage_key, table_for
from ds_realloc.planner.cost import ModelShape
from ds_realloc.planner.estimate import RoleModel, TrainSetting, Workload, call_seconds
from ds_realloc.planner.profile import DeviceProfile, Link, _from_json
from ds_realloc.utils.errors import ConfigError

CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=10, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256)
SHAPE = ModelShape.of(CONFIG)
ROLE = RoleModel(model_spec(CONFIG), SHAPE, trainable=True)
LINK = Link(1e9, 1e-4)


def linear(fixed: float, fixed_per_n: float, layer: float, layer_per_n: float) -> Fit:
    """`fixed + fixed_per_n * n + layers * (layer + layer_per_n * n)` for every n: two sizes, the ends extended."""
    return Fit((0.0, 1.0), (fixed, fixed + fixed_per_n), (layer, layer + layer_per_n))


def _profile(fits: dict) -> DeviceProfile:
    table = ModelTable("bf16", {k: linear(*v) for k, v in fits.items()}).to_json()
    return DeviceProfile("fake", 10**10, {"bf16": 1e12}, 1e11, LINK, LINK, 1e9, 1e8, 2,
                         models={signature(SHAPE, "bf16"): table})


def test_a_fit_goes_through_its_measurements_and_between_them_in_straight_lines():
    # a per-layer time that grows more slowly than the batch (a CPU's GEMMs work better on more rows)
    points = {(1, 80): 0.5, (4, 80): 0.56, (1, 320): 0.6, (4, 320): 0.9, (1, 1280): 1.0, (4, 1280): 1.9}
    fit = shared_layer_fits({"train_lm_z2": points})["train_lm_z2"]
    assert fit.ns == (80, 320, 1280)
    assert fit.layer == pytest.approx((0.02, 0.1, 0.3)) and fit.fixed == pytest.approx((0.48, 0.5, 0.7))
    for (layers, n), seconds in points.items():
        assert fit.at(layers, n) == pytest.approx(seconds)
    assert fit.at(30, 200) == pytest.approx(0.49 + 30 * 0.06)  # halfway between 80 and 320
    assert fit.at(30, 2240) == pytest.approx(0.9 + 30 * 0.5)  # beyond the last size: its segment extended
    assert fit.at(30, 40) == pytest.approx(0.48 - 0.02 / 6 + 30 * (0.02 - 0.08 / 6))  # below the first: likewise
    one_line = linear(0.5, 0.01, 0.2, 0.003)
    assert one_line.at(30, 1000) == pytest.approx(0.5 + 10 + 30 * (0.2 + 3))
    assert linear(-1.0, 0, 0, 0).at(5, 5) == 0.0  # never negative


def test_two_heads_share_one_per_layer_part_by_least_squares():
    """Exact data that agree on the layers come back exactly; data that disagree (noise) meet in the middle."""
    lm, value = linear(0.5, 0.01, 0.2, 0.003), linear(0.1, 0.002, 0.2, 0.003)
    grid = [(layers, n) for layers in (1, 4) for n in (100, 400)]
    fits = shared_layer_fits({"lm": {p: lm.at(*p) for p in grid}, "value": {p: value.at(*p) for p in grid}})
    for point in [(30, 50), (30, 250), (2, 1000)]:
        assert fits["lm"].at(*point) == pytest.approx(lm.at(*point))
        assert fits["value"].at(*point) == pytest.approx(value.at(*point))
    # a: 1 + 0.1 per layer, b: 2 + 0.3 per layer, at layers 1 and 3 (the same at both sizes).
    # By hand: the shared per-layer part is their mean 0.2; each fixed part makes its residuals sum to 0:
    # a's mean time 1 + 0.1 * 2 = 1.2 = fixed + 0.2 * 2 -> 0.8; b's 2 + 0.3 * 2 = 2.6 -> 2.2.
    grid = [(layers, n) for layers in (1, 3) for n in (10, 20)]
    fits = shared_layer_fits({"a": {(l, n): 1 + 0.1 * l for l, n in grid}, "b": {(l, n): 2 + 0.3 * l for l, n in grid}})
    assert fits["a"].fixed == pytest.approx((0.8, 0.8)) and fits["b"].fixed == pytest.approx((2.2, 2.2))
    assert fits["a"].layer == fits["b"].layer == pytest.approx((0.2, 0.2))


def test_tables_round_trip_and_bad_tables_name_the_field(tmp_path):
    profile = _profile({"decode_t1": (1, 2, 3, 4)})
    again = _from_json(profile.to_json(), "p.json")
    assert table_for(again, SHAPE, "bf16").get("decode_t1") == linear(1, 2, 3, 4)
    assert table_for(again, SHAPE, "fp32") is None  # another dtype was not measured
    with pytest.raises(ConfigError, match=r"p.json: field 'models.x' must hold 'dtype' and 'fits'"):
        _from_json(dict(profile.to_json(), models={"x": {"fits": {}}}), "p.json")
    for bad in ([1, 2, 3, 4],  # the format before piecewise fits
                {"n": [1], "fixed": [0.1], "layer": [0.2]},  # one size
                {"n": [4, 1], "fixed": [0.1, 0.2], "layer": [0.2, 0.3]},  # sizes not increasing
                {"n": [1, 4], "fixed": [0.1], "layer": [0.2, 0.3]}):  # columns of different lengths
        with pytest.raises(ConfigError, match=r"p.json: field 'models.x.fits.decode_t1' must hold 'n', 'fixed' and "
                                              r"'layer'"):
            _from_json(dict(profile.to_json(), models={"x": {"dtype": "bf16", "fits": {"decode_t1": bad}}}), "p.json")


def test_stage_one_and_two_stand_for_each_other_and_nothing_else_does():
    fits = {"train_lm_z2": linear(0, 0, 0, 0), "train_lm_z3": linear(0, 0, 0, 0)}
    assert stage_key(1, fits, "lm", "train") == "train_lm_z2" and stage_key(3, fits, "lm", "train") == "train_lm_z3"
    assert stage_key(0, fits, "lm", "train") is None and stage_key(1, fits, "value", "train") is None
    fits["train_lm_z2_d2"] = linear(0, 0, 0, 0)  # a data-parallel engine's times are its own
    assert stage_key(1, fits, "lm", "train", dp=2) == "train_lm_z2_d2" and stage_key(3, fits, "lm", "train", 2) is None


def test_an_engine_timed_data_parallel_over_its_ranks_takes_those_times_collectives_included():
    dp1 = {"train_lm_z3": (0.3, 1e-4, 0.02, 1e-4), "optimizer_lm_z3": (0.07, 0, 0.004, 0),
           "engine_score_lm_z3": (0.01, 1e-5, 0.005, 1e-5)}
    profile = _profile({**dp1, "train_lm_z3_d2": (0.5, 2e-4, 0.03, 1e-4), "optimizer_lm_z3_d2": (0.09, 0, 0.003, 0),
                        "engine_score_lm_z3_d2": (0.02, 1e-5, 0.006, 1e-5)})
    work = Workload(rows=16, prompt_len=50, new_tokens=10, dtype="bf16", minibatches=2)
    train = MFC("actor_train", "actor", MFCKind.TRAIN, ("prompt",))
    two = Allocation(train, DeviceMesh((0, 1)), Strategy(dp=2, zero3=True))
    # 8 rows per rank in micro-batches of 2 x 60 tokens: 4 forward + backward, one optimizer step per minibatch
    micro = 0.5 + 2e-4 * 120 + 10 * (0.03 + 1e-4 * 120)
    assert call_seconds(train, two, ROLE, work, TrainSetting(3, 2), profile) == \
        pytest.approx(4 * micro + 2 * (0.09 + 10 * 0.003))
    logp = MFC("actor_logp", "actor", MFCKind.SCORE, ("prompt",), ("old",))
    forward = 0.02 + 1e-5 * 120 + 10 * (0.006 + 1e-5 * 120)
    assert call_seconds(logp, Allocation(logp, DeviceMesh((0, 1)), Strategy(dp=2, zero3=True)), ROLE, work,
                        TrainSetting(3, 2), profile) == pytest.approx(4 * forward)
    # four ranks were not timed together: the one-rank times and the link model
    four = Allocation(train, DeviceMesh((0, 1, 2, 3)), Strategy(dp=4, zero3=True))
    assert call_seconds(train, four, ROLE, work, TrainSetting(3, 2), profile) == \
        call_seconds(train, four, ROLE, work, TrainSetting(3, 2), _profile(dp1))


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
