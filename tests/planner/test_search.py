"""The search: legal plans only, memory as a hard limit, and annealing finds the brute-force optimum."""

import dataclasses
import itertools

import pytest
from hypothesis import given, settings, strategies as st

from ds_realloc.dataflow.allocation import resolve_allocations
from ds_realloc.dataflow.mfc import MFC, MFCKind
from ds_realloc.layout.layout import Layout
from ds_realloc.layout.mesh import DeviceMesh
from ds_realloc.layout.model import model_spec
from ds_realloc.planner import search as search_module
from ds_realloc.planner.cost import ModelShape
from ds_realloc.planner.estimate import INFEASIBLE_S, RoleModel, TrainSetting, Workload
from ds_realloc.planner.search import Choice, Evaluator, aligned_meshes, search
from ds_realloc.utils.errors import ConfigError
from tests.planner.test_cost import PROFILE, SMALL
from tests.planner.test_estimate import MFCS

GEN_TRAIN = [MFCS[0], MFC("actor_train", "actor", MFCKind.TRAIN, ("prompt", "completion"))]


def _setup(config=SMALL, mfcs=MFCS, world=4, rows=8):
    spec, shape = model_spec(config), ModelShape.of(config)
    roles = {"actor": RoleModel(spec, shape, True), "ref": RoleModel(spec, shape, False)}
    roles = {k: v for k, v in roles.items() if any(m.role == k for m in mfcs)}
    allocations = resolve_allocations(mfcs, world, "", {}, {k: r.spec for k, r in roles.items()}, rows)
    default = {n: Choice(a, TrainSetting(3, 1) if a.mfc.kind is MFCKind.TRAIN else None) for n, a in allocations.items()}
    return roles, default, Workload(rows=rows, prompt_len=16, new_tokens=8)


def test_meshes_are_aligned_slices_of_a_node_or_whole_nodes():
    assert [m.ranks for m in aligned_meshes(2, 2)] == [(0,), (1,), (0, 1)]
    meshes = [m.ranks for m in aligned_meshes(8, 4)]
    assert (2, 3) in meshes and (1, 2) not in meshes and (0, 1, 2, 3, 4, 5, 6, 7) in meshes
    assert (4, 5, 6, 7) in meshes and (2, 3, 4, 5) not in meshes and len(meshes) == 8 + 4 + 2 + 1


@pytest.mark.parametrize("world, rows, new_tokens", [(4, 8, 8), (4, 16, 64), (2, 8, 32)])
def test_annealing_finds_the_brute_force_optimum(monkeypatch, world, rows, new_tokens):
    roles, default, work = _setup(world=world, rows=rows)
    work = dataclasses.replace(work, new_tokens=new_tokens)
    exhaustive = search(MFCS, roles, work, PROFILE, world, default, engine_choices=True)
    assert exhaustive.exhaustive
    monkeypatch.setattr(search_module, "EXHAUSTIVE_LIMIT", 0)
    annealed = search(MFCS, roles, work, PROFILE, world, default, iterations=20_000, engine_choices=True)
    assert not annealed.exhaustive
    assert annealed.estimate.step_s == pytest.approx(exhaustive.estimate.step_s, rel=1e-12)


def test_the_chosen_plan_is_the_cheapest_of_all():
    roles, default, work = _setup()
    plan = search(MFCS, roles, work, PROFILE, 4, default, engine_choices=True)
    evaluator = Evaluator(MFCS, roles, work, PROFILE, 4)
    assert evaluator.objective(plan.choices) == plan.estimate.step_s
    assert evaluator.objective(default) >= plan.estimate.step_s


@settings(max_examples=12, deadline=None)
@given(heads=st.sampled_from([2, 3, 4, 6]), kv_divisor=st.sampled_from([1, 2, 3]), vocab=st.integers(50, 130),
       world=st.sampled_from([1, 2, 4]), rows=st.sampled_from([4, 8, 12]),
       memory=st.sampled_from([2 * 10**6, 10**7, 10**9]))
def test_every_returned_plan_is_legal_and_fits(heads, kv_divisor, vocab, world, rows, memory):
    kv = heads // kv_divisor if heads % kv_divisor == 0 else heads
    config = dict(SMALL, num_attention_heads=heads, num_key_value_heads=kv, hidden_size=heads * 16, vocab_size=vocab)
    roles, default, work = _setup(config, GEN_TRAIN, world, rows)
    profile = dataclasses.replace(PROFILE, memory_bytes=memory, gpus_per_node=min(world, 4))
    try:
        plan = search(GEN_TRAIN, roles, work, profile, world, default, engine_choices=True)
    except ConfigError as e:
        assert "at least" in str(e) and "devices" in str(e)
        return
    assert max(plan.estimate.peak_bytes) <= memory
    for name, choice in plan.choices.items():
        a = choice.allocation
        assert set(a.mesh.ranks) <= set(range(world)) and rows % len(a.dp_groups) == 0
        if a.mfc.kind is MFCKind.TRAIN:
            assert rows // a.mesh.size % choice.train.micro_batch == 0
        else:
            Layout(roles["actor"].spec, a.mesh, a.strategy, fused=True).buffers(a.mesh.ranks[0])  # heads fit
            assert heads % a.strategy.tp == 0


def test_a_model_that_fits_nowhere_says_how_many_devices_it_needs():
    roles, default, work = _setup(NAMED := dict(SMALL, hidden_size=1024, intermediate_size=4096,
                                                num_attention_heads=16, num_key_value_heads=16, vocab_size=32000))
    tiny = dataclasses.replace(PROFILE, memory_bytes=10**6)
    with pytest.raises(ConfigError, match=r"no allocation fits in 0 GiB per device \(fake\).* at least \d+ devices"):
        search(MFCS, roles, work, tiny, 4, default)
    roomy = dataclasses.replace(PROFILE, memory_bytes=2 * 10**9)
    assert NAMED["hidden_size"] == 1024 and Evaluator(MFCS, roles, work, roomy, 4).objective(default) < INFEASIBLE_S
    assert DeviceMesh((0,)).size == 1


def _bowl(state):
    """A one-dimensional cost with its minimum at option 37 of 100."""
    return float(abs(state["x"] - 37))


def test_annealing_keeps_to_its_time_budget(monkeypatch):
    calls = []

    def counted(state):
        calls.append(dict(state))
        return _bowl(state)

    args = ({"x": 100}, {"x": {DeviceMesh((0,)): list(range(100))}}, {"x": [DeviceMesh((0,))]}, {"x": 0}, 0)
    # no time left: the start, evaluated once, nothing proposed
    assert search_module._anneal(counted, *args, budget_s=0.0, iterations=10_000) == {"x": 0} and len(calls) == 1
    # a clock that advances 0.5 s a proposal: a 100 s budget stops a 1,000,000-iteration schedule after
    # about 200, with the best plan found
    clock = itertools.count(0.0, 0.5)
    monkeypatch.setattr(search_module.time, "perf_counter", lambda: next(clock))
    calls.clear()
    assert search_module._anneal(counted, *args, budget_s=100.0, iterations=1_000_000) == {"x": 37}
    assert 190 <= len(calls) <= 202
