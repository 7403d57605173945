"""A step's estimate puts the cost terms on the meshes: calls, our plans' reallocations, moves, memory."""

import pytest

from ds_realloc.dataflow.allocation import AllocationConfig, resolve_allocations
from ds_realloc.dataflow.mfc import MFC, MFCKind
from ds_realloc.layout.model import model_spec
from ds_realloc.planner import cost
from ds_realloc.planner.cost import ModelShape
from ds_realloc.planner.estimate import RoleModel, TrainSetting, Workload, estimate_step
from tests.planner.test_cost import PARAMS, PROFILE, SMALL

MFCS = [MFC("actor_gen", "actor", MFCKind.GENERATE, ("prompt",), ("completion",)),
        MFC("ref_inf", "ref", MFCKind.INFERENCE, ("prompt", "completion"), ("ref_logprobs",)),
        MFC("actor_train", "actor", MFCKind.TRAIN, ("prompt", "completion", "ref_logprobs"))]
WORK = Workload(rows=8, prompt_len=16, new_tokens=8)


def _roles():
    spec, shape = model_spec(SMALL), ModelShape.of(SMALL)
    return {"actor": RoleModel(spec, shape, trainable=True), "ref": RoleModel(spec, shape, trainable=False)}


def _allocations(**per_mfc):
    configs = {name: AllocationConfig(*value) for name, value in per_mfc.items()}
    roles = _roles()
    return resolve_allocations(MFCS, 2, "", configs, {k: r.spec for k, r in roles.items()}, WORK.rows)


def test_a_step_is_its_operations_in_the_runners_order():
    roles, allocations = _roles(), _allocations(ref_inf=("1", "d1"))
    train = {"actor_train": TrainSetting(zero_stage=3, micro_batch=2)}
    estimate = estimate_step(MFCS, allocations, roles, WORK, train, PROFILE, world=2)
    shape = roles["actor"].shape
    gen = cost.generate_s(shape, 4, 16, 8, 1, PROFILE, "bf16")
    ref = cost.score_s(shape, 8, 24, 1, PROFILE, "bf16")
    assert estimate.call_s["actor_gen"] == pytest.approx(gen) and estimate.call_s["ref_inf"] == pytest.approx(ref)
    gather = cost.all_gather_s(PARAMS * 2, 2, PROFILE.intra_node)  # ZeRO-3 over 2 ranks in one node
    train_s = cost.train_compute_s(shape, 4, 24, PROFILE, "bf16") + 3 * 2 * gather + \
        cost.optimizer_s(shape, 3, 2, False, PROFILE, "bf16")
    assert estimate.call_s["actor_train"] == pytest.approx(train_s)
    # the actor's ZeRO-3 halves become two whole replicas: each rank receives the other half
    assert set(estimate.realloc_s) == {"actor_gen"}  # the frozen reference keeps its copy between steps
    spans = {s.name: s for s in estimate.timeline.spans if s.rank == 1}
    order = ["realloc:actor_gen", "actor_gen", "move:ref_inf", "ref_inf", "move:actor_train", "actor_train"]
    assert sorted(spans, key=lambda n: spans[n].start) == order  # every op touches rank 1: one after another
    assert estimate.step_s == pytest.approx(sum(spans[n].end - spans[n].start for n in order))
    assert spans["ref_inf"].end - spans["ref_inf"].start == pytest.approx(ref)


def test_memory_per_rank_is_resident_states_plus_the_largest_call():
    roles, allocations = _roles(), _allocations(ref_inf=("1", "d1"))
    train = {"actor_train": TrainSetting(zero_stage=3, micro_batch=2)}
    estimate = estimate_step(MFCS, allocations, roles, WORK, train, PROFILE, world=2)
    shape = roles["actor"].shape
    # the actor's states and its gradient bucket (touched by the first backward, its pages stay)
    states = cost.train_state_bytes(shape, 3, 2, False, False, "bf16") + cost.gradient_bucket_bytes(shape, 3, "bf16")
    # rank 1 also holds the frozen reference's engine (all of it: a mesh of one) and its kept inference copy
    assert estimate.resident_bytes == (states, states + 2 * PARAMS * 2)
    train_extra = cost.train_peak_bytes(shape, 3, 2, 2, 24, False, False, "bf16") - states
    gen_extra = cost.inference_peak_bytes(shape, 4, 24, 1, "bf16", 4)
    ref_extra = cost.inference_peak_bytes(shape, 8, 24, 1, "bf16", 8 * 24) - PARAMS * 2
    assert estimate.peak_bytes[0] == states + max(train_extra, gen_extra)
    assert estimate.peak_bytes[1] == states + 2 * PARAMS * 2 + max(train_extra, gen_extra, ref_extra)


def test_zero_2_replicas_need_no_reallocation_into_a_data_parallel_layout():
    roles, allocations = _roles(), _allocations()
    estimate = estimate_step(MFCS, allocations, roles, WORK, {"actor_train": TrainSetting(zero_stage=2)}, PROFILE, 2)
    assert "actor_gen" not in estimate.realloc_s  # whole replicas on both ranks already: d2 copies locally
    three = estimate_step(MFCS, allocations, roles, WORK, {"actor_train": TrainSetting(zero_stage=3)}, PROFILE, 2)
    assert three.realloc_s["actor_gen"] > 0


@pytest.mark.parametrize("home, zero3, mesh, dp, tp", [
    (8, True, (0, 8), 4, 2), (8, True, (0, 8), 1, 8), (4, True, (0, 8), 2, 4), (4, True, (4, 8), 4, 1),
    (4, True, (0, 2), 1, 2), (8, True, (0, 4), 4, 1), (4, False, (0, 4), 1, 4), (4, True, (0, 4), 1, 4),
    (4, False, (4, 8), 2, 2)])
@pytest.mark.parametrize("model", ["llama-7b", "llama-34b"])
def test_the_analytic_traffic_equals_the_exact_plans(model, home, zero3, mesh, dp, tp):
    """Large searches cost reallocations from the layouts alone; on every case small enough to build the
    plan, the busiest rank's bytes are the plan's own."""
    from ds_realloc.layout.layout import Layout
    from ds_realloc.layout.mesh import DeviceMesh, Strategy
    from ds_realloc.layout.model import NAMED_CONFIGS
    from ds_realloc.planner.estimate import _plan_traffic, analytic_traffic, layer_scaled

    spec = model_spec(NAMED_CONFIGS[model])
    src = Layout(spec, DeviceMesh(tuple(range(home))), Strategy(dp=home, zero3=zero3))
    dst = Layout(spec, DeviceMesh(tuple(range(*mesh))), Strategy(dp=dp, tp=tp), fused=True)
    analytic, exact = analytic_traffic(spec, src, dst), _plan_traffic(spec, src, dst)
    assert analytic.received == exact.received
    # bucket buffers per rank: an estimate, pessimistic where a shard overlaps the rank's own partition
    estimated, built = dict(analytic.bucket), dict(exact.bucket)
    assert set(built) <= set(estimated)
    assert all(0.7 * built[r] <= estimated[r] <= 4.5 * built[r] for r in built)
    # the search prices them from the 1- and 2-layer models, scaled in the layer count: the same figures
    scaled = layer_scaled(_plan_traffic, spec, src, dst)
    assert scaled[:3] == exact[:3] and layer_scaled(analytic_traffic, spec, src, dst) == analytic
    if zero3:  # whole replicas spread the units they send over the senders unevenly: within 15% there
        assert scaled.bucket == exact.bucket
    else:
        assert all(0.85 * built[r] <= got <= built[r] for r, got in scaled.bucket)


def test_a_reallocation_holds_one_layers_buffers_on_each_of_its_ranks():
    """Generation on rank 1 alone: rank 0 sends its ZeRO-3 half one layer's pieces at a time, and holds
    those send buffers beside whatever else it runs."""
    from ds_realloc.layout.layout import Layout
    from ds_realloc.layout.mesh import DeviceMesh, Strategy
    from ds_realloc.layout.plan import ReallocPlan
    from ds_realloc.planner.estimate import realloc_op

    roles = _roles()
    allocations = _allocations(actor_gen=("1", "d1"), ref_inf=("1", "d1"))  # rank 0 runs only the training
    setting = TrainSetting(zero_stage=3, micro_batch=2)
    spec, shape = roles["actor"].spec, roles["actor"].shape
    home = DeviceMesh((0, 1))
    stats = ReallocPlan.build(spec, Layout(spec, home, Strategy(dp=2, zero3=True)),
                              Layout(spec, DeviceMesh((1,)), Strategy(dp=1), fused=True)).stats()
    op, buckets = realloc_op(MFCS[0], allocations["actor_gen"], roles["actor"], home, setting, WORK, PROFILE)
    assert op.ranks == (0, 1) and buckets == {r: n * 2 for r, n in stats.bucket.items()} and buckets[0] > 0
    estimate = estimate_step(MFCS, allocations, roles, WORK, {"actor_train": setting}, PROFILE, world=2)
    train_extra = cost.train_peak_bytes(shape, 3, 2, 2, 24, False, False, "bf16") - \
        cost.train_state_bytes(shape, 3, 2, False, False, "bf16") - cost.gradient_bucket_bytes(shape, 3, "bf16")
    assert estimate.peak_bytes[0] == estimate.resident_bytes[0] + max(train_extra, buckets[0])
