"""The step's targets (rl_targets): one computation of rewards, KL, advantages and returns."""

import pytest
import torch

from ds_realloc.algorithms.policy import PolicyConfig, TargetsInterface
from tests.distributed import run_ranks


def _batch(rows: int, score: float = 1.0, **extra):
    g = torch.Generator().manual_seed(3)
    lengths = [2 + i % 3 for i in range(rows)]
    batch = {"completion": [(5,) * n for n in lengths], "truncated": [False] * rows, "score": [score] * rows,
             "gen_logprobs": [-torch.rand(n, generator=g) for n in lengths],
             "ref_logprobs": [-torch.rand(n, generator=g) for n in lengths],
             "values": [torch.randn(n + 1, generator=g) for n in lengths]}
    batch.update(extra)
    return batch


def test_remax_with_the_greedy_score_equal_to_the_sampled_one_gives_advantage_0():
    """Both go through the same clip / scale / bias: score = greedy = 10 with reward_clip 5 is 0, not -5."""
    cfg = PolicyConfig(advantage="remax", whiten_advantages=False, kl_coef=0.0, reward_clip=5.0, reward_scale=2.0,
                       reward_bias=1.0)
    out = TargetsInterface(cfg).inference(None, _batch(4, score=10.0, greedy_score=[10.0] * 4))
    assert all(torch.equal(a, torch.zeros_like(a)) for a in out["advantages"])


def _adaptive_kl(rank: int, world: int) -> float:
    import torch.distributed as dist

    batch = _batch(8)
    share = 8 // world
    mine = {key: values[rank * share:(rank + 1) * share] for key, values in batch.items()}
    targets = TargetsInterface(PolicyConfig(adaptive_kl=True, kl_coef=0.1, kl_target=0.5, kl_horizon=20),
                               group=dist.group.WORLD if world > 1 else None)
    targets.inference(None, mine)
    return targets.kl.value


def test_adaptive_kl_on_two_ranks_equals_one_rank():
    one = run_ranks(_adaptive_kl, 1, timeout=60)[0]
    two = run_ranks(_adaptive_kl, 2, timeout=60)
    assert one != 0.1  # it moved
    assert two == [pytest.approx(one, rel=1e-12)] * 2
