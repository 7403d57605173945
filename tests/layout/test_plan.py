"""Plan invariants against an element-by-element oracle, on random models and layouts."""

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ds_realloc.layout.layout import Layout
from ds_realloc.layout.mesh import DeviceMesh, Strategy, parse_strategy
from ds_realloc.layout.model import NAMED_CONFIGS, model_spec
from ds_realloc.layout.plan import ReallocPlan, max_weight_assignment


def _positions(layout: Layout, rank: int) -> dict[str, dict[int, tuple[str, int]]]:
    """buffer -> local position -> (param, full index) the layout puts there."""
    out = {}
    for buffer in layout.buffers(rank):
        where = {}
        for member in buffer.members:
            for run in member.runs:
                for full, local in run.pairs():
                    assert local not in where and local < buffer.numel
                    where[local] = (member.param, full)
        out[buffer.name] = where
    return out


def _check(plan: ReallocPlan, sample_ranks: int = 24, seed: int = 0):
    src, dst = plan.src, plan.dst
    stats = plan.stats()
    dst_ranks = list(dst.ranks)
    checked = dst_ranks if len(dst_ranks) <= sample_ranks else random.Random(seed).sample(dst_ranks, sample_ranks)
    src_positions = {}
    for d in checked:
        expected = _positions(dst, d)
        written = {name: {} for name in expected}
        received = 0
        for bucket in plan.program(d):
            sources = [(d, t) for t in bucket.local] + [(s, t) for s, ts in bucket.recv.items() for t in ts]
            for s, transfer in sources:
                if s not in src_positions:
                    src_positions[s] = _positions(src, s)
                for piece in transfer.pieces:
                    for j, e in itertools.product(range(piece.count), range(piece.length)):
                        at_src = src_positions[s][transfer.src_buffer][piece.src + j * piece.src_stride + e]
                        local = piece.dst + j * piece.dst_stride + e
                        assert local not in written[transfer.dst_buffer], "an element is written twice"
                        written[transfer.dst_buffer][local] = at_src  # the sender holds exactly this element
                        received += s != d
        assert written == expected, f"rank {d}: destination buffers differ from the layout"
        held = {v for where in _positions(src, d).values() for v in where.values()} if d in src.ranks else set()
        # needed elements in several buffers (a tied head) count once per buffer
        needed_total = sum(len(where) for where in expected.values())
        held_needed = sum(1 for where in expected.values() for v in where.values() if v in held)
        assert received == stats.recv.get(d, 0) == needed_total - held_needed
    assert sum(stats.recv.values()) == sum(stats.send.values())
    for r in checked + [s for s in src.ranks if s not in dst.ranks][:sample_ranks]:
        # one bucket's send and receive buffers, as `reallocate` allocates them from the programme
        held = [sum(t.numel for ts in (*b.send.values(), *b.recv.values()) for t in ts) for b in plan.program(r)]
        assert stats.bucket.get(r, 0) == max(held, default=0), f"rank {r}: bucket bytes"
    # the bound's per-rank split may be another optimal placement's; its total is what any optimum receives
    assert sum(stats.recv.values()) == sum(stats.lower_bound.values())


def _small_config(rng: random.Random, family: str) -> dict:
    heads = rng.choice([2, 4, 8])
    kv = rng.choice([h for h in (1, 2, 4, 8) if heads % h == 0])
    head_dim = rng.choice([1, 2, 3])
    config = dict(model_type=family, hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv,
                  head_dim=head_dim, intermediate_size=rng.choice([8, 16, 24]), num_hidden_layers=rng.randint(1, 3),
                  vocab_size=rng.randint(9, 40), tie_word_embeddings=rng.random() < 0.5)
    if family == "gpt2":
        config.update(n_embd=heads * head_dim, n_head=heads, n_layer=config["num_hidden_layers"], n_positions=6,
                      n_inner=4 * heads * head_dim)
    return config


def _random_layout(rng: random.Random, model, world: int, tp_max: int) -> Layout:
    size = rng.choice([n for n in (1, 2, 3, 4, 8, 16, 64, 256, 1024) if n <= world])
    ranks = rng.sample(range(world), size)
    if rng.random() < 0.3:
        return Layout(model, DeviceMesh(tuple(ranks)), Strategy(dp=rng.choice([d for d in (1, 2, 4, size) if size % d == 0]),
                                                                zero3=True))
    tp = rng.choice([t for t in (1, 2, 4, 8) if size % t == 0 and t <= tp_max])
    rest = size // tp
    pp = rng.choice([p for p in (1, 2, 3, 4) if rest % p == 0 and p <= model.num_units])
    return Layout(model, DeviceMesh(tuple(ranks)), Strategy(dp=rest // pp, tp=tp, pp=pp), fused=rng.random() < 0.5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**9), st.sampled_from(["llama", "qwen2", "gpt2"]), st.sampled_from([4, 16, 1024]))
def test_every_element_written_once_by_a_holder_and_traffic_is_the_lower_bound(seed, family, world):
    rng = random.Random(seed)
    config = _small_config(rng, family)
    model = model_spec(config, value_head=rng.random() < 0.2)
    tp_max = min(config["num_attention_heads"], 8)
    if family == "gpt2":
        tp_max = 1 if config["n_embd"] % 2 else tp_max
    src, dst = (_random_layout(rng, model, world, tp_max) for _ in range(2))
    try:
        plan = ReallocPlan.build(model, src, dst)
    except Exception as error:  # only the documented shard-rule errors are acceptable
        assert "does not divide" in str(error) or "do not divide" in str(error), error
        return
    _check(plan, seed=seed)


def test_sends_and_receives_pair_up():
    model = model_spec(dict(model_type="llama", hidden_size=8, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=16, num_hidden_layers=2, vocab_size=20))
    mesh = DeviceMesh((0, 1, 2, 3))
    for src_text, dst_text in [("zero3", "d2t2"), ("d2t2", "t4"), ("t4", "p2t2"), ("p2t2", "zero3")]:
        plan = ReallocPlan.build(model, Layout(model, mesh, parse_strategy(src_text, 4)),
                                 Layout(model, mesh, parse_strategy(dst_text, 4)))
        for s, d in itertools.permutations(range(4), 2):
            sent = [(b.unit, b.send.get(d, [])) for b in plan.program(s)]
            got = [(b.unit, b.recv.get(s, [])) for b in plan.program(d)]
            assert [x for x in sent if x[1]] == [x for x in got if x[1]]


def test_zero3_to_tp_on_the_same_ranks_moves_only_what_dim0_shards_lack():
    model = model_spec(dict(model_type="llama", hidden_size=8, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=16, num_hidden_layers=2, vocab_size=20))
    mesh = DeviceMesh((5, 9))
    plan = ReallocPlan.build(model, Layout(model, mesh, Strategy(dp=2, zero3=True)), Layout(model, mesh, Strategy(tp=2)))
    stats = plan.stats()
    # dim-0 shards of even-sized params are exactly the local ZeRO-3 partitions: only row-parallel
    # weights (half of each row lies on the other rank) and replicated norms move
    moved = sum(p.numel // 4 for p in model.params if p.name.endswith(("o_proj.weight", "down_proj.weight")))
    moved += sum(p.numel // 2 for p in model.params if "norm" in p.name)
    assert stats.recv == {5: moved, 9: moved} and stats.messages == 2


def test_placement_puts_tp_ranks_where_their_data_is():
    model = model_spec(dict(model_type="llama", hidden_size=8, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=16, num_hidden_layers=2, vocab_size=20))
    src = Layout(model, DeviceMesh((0, 1)), Strategy(dp=2, zero3=True))
    dst = Layout(model, DeviceMesh((1, 0)), Strategy(tp=2))  # listed in the "wrong" order
    plan = ReallocPlan.build(model, src, dst)
    assert plan.dst.coords(0) == (0, 0, 0) and plan.dst.coords(1) == (0, 1, 0)
    unplaced = ReallocPlan.build(model, src, dst, place=False)
    assert sum(plan.stats().recv.values()) < sum(unplaced.stats().recv.values())


@given(st.lists(st.lists(st.integers(0, 20), min_size=4, max_size=4), min_size=4, max_size=4))
def test_assignment_is_optimal(weights):
    best = max(sum(weights[i][p[i]] for i in range(4)) for p in itertools.permutations(range(4)))
    assignment = max_weight_assignment(weights)
    assert sorted(assignment) == [0, 1, 2, 3] and sum(weights[i][assignment[i]] for i in range(4)) == best


def test_llama_70b_on_128_ranks_meets_the_bound():
    """The README's plan-stats example (how long it takes is `plan-stats`'s printed build time, not a test)."""
    model = model_spec(NAMED_CONFIGS["llama-70b"])
    mesh = DeviceMesh(tuple(range(128)))
    plan = ReallocPlan.build(model, Layout(model, mesh, Strategy(dp=128, zero3=True)),
                             Layout(model, mesh, Strategy(dp=16, tp=8)))
    stats = plan.stats()
    assert sum(stats.recv.values()) == sum(stats.lower_bound.values())
    per_rank_shard = model.numel // 8  # roughly: every rank needs one tp shard of everything
    assert all(0.8 * per_rank_shard < v < 1.2 * per_rank_shard for v in stats.recv.values())


@pytest.mark.parametrize("src_text,dst_text,dst_ranks", [
    ("zero3", "t2", (1, 0)), ("zero3", "t4", (3, 1, 0, 2)), ("zero3", "d2t2", (0, 1, 2, 3)),
    ("d2t2", "t4", (2, 3, 0, 1)), ("t4", "d2t2", (1, 3, 2, 0)), ("zero3:d2", "p2t2", (0, 1, 2, 3))])
def test_the_lower_bound_is_the_least_any_placement_receives(src_text, dst_text, dst_ranks):
    """By brute force over every placement the plan may choose (each tensor-parallel group's ranks in
    any order; which ranks form a group is the mesh's, e.g. one node's): the bound, computed from the
    two layouts alone, is the least total any such plan receives, and ours meets it."""
    from ds_realloc.layout.plan import lower_bound

    model = model_spec(dict(model_type="llama", hidden_size=8, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=16, num_hidden_layers=2, vocab_size=20))
    src = Layout(model, DeviceMesh((0, 1, 2, 3)), parse_strategy(src_text, 4))
    strategy = parse_strategy(dst_text)
    dst = Layout(model, DeviceMesh(dst_ranks[:strategy.size]), strategy)
    ranks = dst.mesh.ranks
    groups = [[strategy.index(dp, tp, pp) for tp in range(strategy.tp)]
              for pp in range(strategy.pp) for dp in range(strategy.dp)]
    received = {}
    for orders in itertools.product(*(itertools.permutations(group) for group in groups)):
        placement = list(ranks)
        for group, order in zip(groups, orders):
            for index, source in zip(group, order):
                placement[index] = ranks[source]
        plan = ReallocPlan.build(model, src, dst.with_placement(tuple(placement)))
        received[tuple(placement)] = sum(plan.stats().recv.values())
    bound = sum(lower_bound(src, dst).values())
    assert bound == min(received.values())
    assert sum(ReallocPlan.build(model, src, dst).stats().recv.values()) == bound
    if max(received.values()) > bound:  # a worse placement shows against the bound
        assert sum(ReallocPlan.build(model, src, dst, place=False).stats().recv.values()) >= bound


def test_mixtral_experts_split_inside_every_expert_and_bad_routing_is_named():
    from ds_realloc.layout.layout import Layout
    from ds_realloc.layout.mesh import DeviceMesh, Strategy
    from ds_realloc.layout.model import model_spec
    from ds_realloc.utils.errors import ConfigError

    config = dict(model_type="mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=260, num_local_experts=4,
                  num_experts_per_tok=2)
    model = model_spec(config)
    shards = {b.name: b.shape for b in Layout(model, DeviceMesh((0, 1)), Strategy(tp=2), fused=True).buffers(1)}
    assert shards["model.layers.0.mlp.experts.gate_up_proj"] == (4, 96, 64)  # [gate half; up half] of 2 x 96
    assert shards["model.layers.0.mlp.experts.down_proj"] == (4, 64, 48)
    assert shards["model.layers.0.mlp.gate.weight"] == (4, 64)  # the router, replicated
    with pytest.raises(ConfigError, match=r"num_experts_per_tok=5 must be within \[1, num_local_experts=4\]"):
        model_spec({**config, "num_experts_per_tok": 5})
