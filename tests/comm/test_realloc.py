"""Reallocation on real processes (gloo): destination shards equal torch slices of the full state dict
bit for bit, for every pair of layouts, on identical, overlapping and disjoint meshes."""

import itertools

import pytest
import torch

from tests.comm.oracle import expected_buffers, source_buffers
from tests.distributed import run_ranks

STRATEGIES = {"zero3:d2": 2, "zero3:d4": 4, "d2": 2, "t2": 2, "d2t2": 4, "t4": 4, "p2": 2, "p2t2": 4, "d1": 1}
PLACEMENTS = {1: [(0,), (3,)], 2: [(0, 1), (2, 3), (1, 2)], 4: [(0, 1, 2, 3), (3, 2, 1, 0)]}


def _state(preset: str) -> tuple[object, dict[str, torch.Tensor]]:
    from transformers import AutoConfig

    from ds_realloc.layout.model import model_spec
    from ds_realloc.models.hf_io import CheckpointReader
    from ds_realloc.models.presets import resolve_model_path

    path = resolve_model_path(preset)
    reader, config = CheckpointReader(path), AutoConfig.from_pretrained(path)
    names = [p.name for p in model_spec(config).params]  # live names (fused experts read from their pieces)
    return config, {name: reader.read(reader.resolve(name, "model")) for name in names}


def _layout(model, strategy: str, ranks: tuple[int, ...], fused: bool):
    from ds_realloc.layout.layout import Layout
    from ds_realloc.layout.mesh import DeviceMesh, parse_strategy

    return Layout(model, DeviceMesh(ranks), parse_strategy(strategy, len(ranks)), fused=fused and "t" in strategy)


def _mesh_pairs(world: int, src_size: int, dst_size: int):
    placements = {size: [p for p in options if max(p) < world] for size, options in PLACEMENTS.items()}
    src_first = placements[src_size][0]
    pairs = [(src_first, placements[dst_size][0])]  # identical or overlapping
    disjoint = [p for p in placements[dst_size] if not set(p) & set(src_first)]
    if disjoint:
        pairs.append((src_first, disjoint[0]))
    elif len(placements[dst_size]) > 1:
        pairs.append((src_first, placements[dst_size][-1]))  # another order of the same ranks
    return pairs


def _every_pair(rank, world, preset, dtype_names):
    import os

    import torch.distributed as dist

    from ds_realloc import ops
    from ds_realloc.comm import realloc
    from ds_realloc.comm.realloc import ReallocStats, reallocate

    assert (ops.kernel("interval_copy") is not None) == (os.environ["DS_REALLOC_DISABLE_OPS"] == "0")
    realloc.KERNEL_MIN_PIECES = 1  # every transfer through the kernel (where loaded), not only the irregular ones
    from ds_realloc.layout.model import model_spec
    from ds_realloc.layout.plan import ReallocPlan

    config, state = _state(preset)
    model = model_spec(config)
    strategies = {s: n for s, n in STRATEGIES.items() if n <= world}
    mismatches, checked = [], 0
    for (i, (src_s, src_n)), (dst_s, dst_n) in itertools.product(enumerate(strategies.items()), strategies.items()):
        for j, (src_ranks, dst_ranks) in enumerate(_mesh_pairs(world, src_n, dst_n)):
            for dtype in (getattr(torch, name) for name in dtype_names):
                src = _layout(model, src_s, src_ranks, fused=False)
                dst = _layout(model, dst_s, dst_ranks, fused=(i + j) % 2 == 1)
                plan = ReallocPlan.build(model, src, dst)
                sources = source_buffers(src, rank, state, dtype) if rank in src.ranks else {}
                executed = ReallocStats()
                got = reallocate(plan, sources, dtype, torch.device("cpu"), stats=executed)
                if executed.peak_bucket_bytes != plan.stats().bucket.get(rank, 0) * dtype.itemsize:
                    mismatches.append((str(src), str(plan.dst), str(dtype), "bucket bytes"))  # what the planner counts
                if rank in plan.dst.ranks:
                    want = expected_buffers(plan.dst, rank, state, dtype)
                    assert set(got) == set(want), (src, dst)
                    bad = [name for name in want if not torch.equal(got[name], want[name])]
                    if bad:
                        mismatches.append((str(src), str(plan.dst), str(dtype), bad[:3]))
                    checked += 1
                dist.barrier()
    return mismatches, checked


BOTH = ("float32", "bfloat16")


# Casting is the same code for every family: the other families' sharding rules are checked in fp32.
@pytest.mark.parametrize("world,preset,kernels,dtypes", [
    (4, "tiny-llama", True, BOTH), (4, "tiny-qwen2", True, BOTH[:1]), (4, "tiny-gpt2", True, BOTH[:1]),
    (2, "tiny-llama", True, BOTH), (2, "tiny-llama", False, BOTH)])
def test_every_layout_pair_gives_exact_shards(world, preset, kernels, dtypes):
    """With the interval-copy kernel packing and unpacking, and with its torch fallback."""
    results = run_ranks(_every_pair, world, preset, dtypes, timeout=600,
                        env={"DS_REALLOC_DISABLE_OPS": str(int(not kernels))})
    mismatches = [m for rank_mismatches, _ in results for m in rank_mismatches]
    assert not mismatches, mismatches[:5]
    assert sum(checked for _, checked in results) > 25 * len(dtypes)


def _zero3_engine(path, world_ranks, dtype_name, offload):
    from ds_realloc.engine.config import EngineConfig, OptimConfig
    from ds_realloc.engine.ds_config import BatchGeometry, train_ds_config
    from ds_realloc.engine.factory import build_train_engine
    from ds_realloc.utils.dist import group_of

    config = train_ds_config(EngineConfig(zero_stage=3, dtype=dtype_name, offload_param=offload,
                                          offload_optimizer=offload),
                             OptimConfig(lr=1e-2), BatchGeometry(1, 1, len(world_ranks)), total_steps=10)
    return build_train_engine(path, "lm", config, dp_group=group_of(world_ranks))


def _train_step(engine):
    from ds_realloc.algorithms.functional import sft_loss

    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 250, 11]])
    loss = sft_loss(engine(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, ids, torch.ones_like(ids))
    engine.backward(loss)
    engine.step()


def _full_weights(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone().float() for name, p in params.items()}


def _from_engine(rank, world, dtype_name, offload, train_ranks, preset="tiny-llama"):
    import torch.distributed as dist

    from ds_realloc.comm.realloc import KeptWeights, check_zero3_layout, reallocate, zero3_sources
    from ds_realloc.layout.layout import Layout
    from ds_realloc.layout.mesh import DeviceMesh, Strategy
    from ds_realloc.layout.model import model_spec
    from ds_realloc.layout.plan import ReallocPlan
    from ds_realloc.models.presets import resolve_model_path

    dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
    config, state = _state(preset)
    model = model_spec(config)
    engine = _zero3_engine(resolve_model_path(preset), train_ranks, dtype_name, offload) \
        if rank in train_ranks else None
    src = Layout(model, DeviceMesh(train_ranks), Strategy(dp=len(train_ranks), zero3=True))
    sources = zero3_sources(engine.module) if engine else {}
    if engine:
        check_zero3_layout(engine.module, src, rank)
        assert all(t.device.type == "cpu" for t in sources.values())
    others = tuple(r for r in range(world) if r not in train_ranks)
    targets = [("t2", train_ranks[:2]), ("d2", tuple(range(world))[-2:]), ("d1", (world - 1,))]
    if world == 4:
        targets += [("p2t2", (3, 2, 1, 0)), ("t2", others or (2, 3))]
    if any(p.experts for p in model.params):  # expert parallel: experts split over data-parallel ranks (and tp inside)
        targets += [("d2e2", tuple(range(world))[-2:])] + ([("d2t2e2", (0, 1, 2, 3))] if world == 4 else [])
    before = {name: t.clone() for name, t in sources.items()}
    checked = 0
    for round_, (strategy, ranks) in itertools.product(range(2), targets):
        dst = _layout(model, strategy, ranks, fused=True)
        plan = ReallocPlan.build(model, src, dst)
        got = reallocate(plan, sources, dtype, torch.device("cpu"))
        if rank in plan.dst.ranks:
            want = expected_buffers(plan.dst, rank, state, dtype)
            for name in want:
                assert torch.equal(got[name], want[name]), (round_, strategy, ranks, name)
            checked += 1
        assert all(torch.equal(before[name], sources[name]) for name in sources)  # partitions untouched
    # after an optimizer step, the next reallocation carries the new weights; a kept copy is stale
    kept = KeptWeights(src, engine.global_steps if engine else None, {})
    if engine:
        assert kept.current(src, engine.global_steps)
        _train_step(engine)
        assert not kept.current(src, engine.global_steps)
        new_state = _full_weights(engine)
        assert any(not torch.equal(new_state[n].to(dtype), state[n].to(dtype)) for n in new_state)
    else:
        new_state = None
    new_state = _broadcast_state(new_state, train_ranks[0])
    dst = _layout(model, "t2", targets[0][1], fused=False)
    got = reallocate(ReallocPlan.build(model, src, dst), sources, dtype, torch.device("cpu"))
    if rank in dst.ranks:
        want = expected_buffers(ReallocPlan.build(model, src, dst).dst, rank, new_state, dtype)
        for name in want:
            assert torch.equal(got[name], want[name]), name
    dist.barrier()
    return checked


def _broadcast_state(state, src_rank):
    import torch.distributed as dist

    holder = [state]
    dist.broadcast_object_list(holder, src=src_rank)
    return holder[0]


@pytest.mark.parametrize("world,dtype,offload,train_ranks,preset", [
    (2, "fp32", False, (0, 1), "tiny-llama"), (2, "bf16", False, (0, 1), "tiny-llama"),
    (2, "fp32", True, (0, 1), "tiny-llama"), (4, "fp32", False, (0, 1, 2, 3), "tiny-llama"),
    (4, "bf16", True, (0, 1), "tiny-mixtral"), (2, "fp32", False, (0, 1), "tiny-mixtral"),
    (4, "fp32", False, (0, 1), "tiny-qwen3-moe"), (2, "bf16", True, (0, 1), "tiny-qwen3-moe")])
def test_from_live_zero3_partitions(world, dtype, offload, train_ranks, preset):
    """ZeRO-3 partitions read in place (also offloaded to CPU) feed any layout, on overlapping or
    disjoint ranks, leave the partitions untouched, and carry the weights of the latest step (the
    fused expert tensors of a mixture of experts too)."""
    checked = run_ranks(_from_engine, world, dtype, offload, train_ranks, preset, timeout=600)
    assert sum(checked) > 0


def _into_reference(rank, world):
    from ds_realloc.comm.realloc import reallocate, zero3_sources
    from ds_realloc.engine.ds_config import frozen_ds_config
    from ds_realloc.engine.factory import build_frozen_model
    from ds_realloc.layout.layout import Layout
    from ds_realloc.layout.mesh import DeviceMesh, Strategy
    from ds_realloc.layout.model import model_spec
    from ds_realloc.layout.plan import ReallocPlan
    from ds_realloc.models.presets import resolve_model_path

    path = resolve_model_path("tiny-llama")
    config, _ = _state("tiny-llama")
    model = model_spec(config)
    actor = _zero3_engine(path, tuple(range(world)), "fp32", False)
    reference = build_frozen_model(path, "lm", frozen_ds_config(actor.config, offload=False), offload=False)
    _train_step(actor)
    mesh = DeviceMesh(tuple(range(world)))
    zero3 = Layout(model, mesh, Strategy(dp=world, zero3=True))
    plan = ReallocPlan.build(model, zero3, zero3)
    actor_parts, ref_parts = zero3_sources(actor.module), zero3_sources(reference.module)
    old = {name: t.clone() for name, t in ref_parts.items()}
    assert any(not torch.equal(old[n], actor_parts[n]) for n in old)
    reallocate(plan, actor_parts, torch.float32, torch.device("cpu"), targets=ref_parts, ema=0.25)
    for name in old:  # reference EMA: dst = eta * src + (1 - eta) * dst
        assert torch.equal(ref_parts[name], old[name].clone().mul_(0.75).add_(actor_parts[name], alpha=0.25)), name
    reallocate(plan, actor_parts, torch.float32, torch.device("cpu"), targets=ref_parts)
    for name in old:  # initialise the reference from the actor: bitwise
        assert torch.equal(ref_parts[name], actor_parts[name]), name
    assert ReallocPlan.build(model, zero3, zero3).stats().recv == {r: 0 for r in range(world)}
    return True


def test_into_another_models_partitions_and_reference_ema():
    assert all(run_ranks(_into_reference, 2))
