"""RL math against hand-computed cases."""

import math

import pytest
import torch

from ds_realloc.algorithms.functional import (AdaptiveKLController, RunningMeanStd, aggregate, gae_packed,
                                              group_advantages, kl_estimate, leave_one_out_advantages,
                                              next_token_logprobs, ppo_policy_loss, shape_rewards, value_loss,
                                              whiten)


def test_gae_packed_by_hand():
    # sequence 0: 2 actions, ended with EOS (terminal value 0); sequence 1: 1 action, truncated
    rewards = torch.tensor([1.0, 2.0, 3.0])
    values = torch.tensor([0.5, 0.25, 9.0,  # v_0, v_1, v_2 of sequence 0 (v_2 ignored: EOS)
                           1.0, 4.0])       # v_0, v_1 of sequence 1 (v_1 bootstraps)
    cu = torch.tensor([0, 2, 3])
    gamma, lam = 0.9, 0.8
    adv, ret = gae_packed(rewards, values, cu, torch.tensor([False, True]), gamma, lam)
    d1 = 2.0 + gamma * 0.0 - 0.25
    d0 = 1.0 + gamma * 0.25 - 0.5
    a1 = d1
    a0 = d0 + gamma * lam * a1
    a2 = 3.0 + gamma * 4.0 - 1.0
    torch.testing.assert_close(adv, torch.tensor([a0, a1, a2]))
    torch.testing.assert_close(ret, torch.tensor([a0 + 0.5, a1 + 0.25, a2 + 1.0]))


def test_whiten_and_aggregation():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    w = whiten(x, mask)
    valid = w[mask.bool()]
    assert abs(valid.mean().item()) < 1e-6 and abs(valid.var(unbiased=False).item() - 1) < 1e-4
    assert w[1, 1] == 0  # masked entries are zeroed
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert aggregate(losses, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(losses, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    # Dr. GRPO: each sequence's token sum over a constant (here 8 = max_new_tokens), mean over sequences
    assert aggregate(losses, mask, "seq-mean-token-sum-norm", 8).item() == pytest.approx((6 / 8 + 4 / 8) / 2)


def test_a_dr_grpo_row_weighs_the_same_whatever_shares_its_micro_batch():
    from ds_realloc.algorithms.functional import aggregate_sum

    row = torch.tensor([[1.0, 2.0]])
    alone = aggregate_sum(row, torch.ones(1, 2), "seq-mean-token-sum-norm", 16)
    wide = torch.tensor([[0.0, 0.0, 1.0, 2.0], [5.0, 6.0, 7.0, 8.0]])  # padded to width 4 beside a longer row
    with_other = aggregate_sum(wide, torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), "seq-mean-token-sum-norm", 16)
    other = aggregate_sum(wide[1:], torch.ones(1, 4), "seq-mean-token-sum-norm", 16)
    assert with_other.item() - other.item() == pytest.approx(alone.item())


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    r = torch.exp(ref - logp)
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), r - 1 - torch.log(r))
    assert (kl_estimate(logp, ref, "k3") >= 0).all()


def test_reward_shaping_puts_the_score_on_the_last_action():
    kl = torch.tensor([0.1, 0.2, 0.3, 0.4])
    cu = torch.tensor([0, 3, 4])
    rewards = shape_rewards(torch.tensor([2.0, -10.0]), kl, cu, kl_coef=0.5, clip=5.0, scale=2.0, bias=1.0)
    torch.testing.assert_close(rewards, torch.tensor([-0.05, -0.1, -0.15 + 2.0, -0.2 - 5.0]))


def test_adaptive_kl_controller():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=100)
    controller.update(kl=12.0, steps=10)  # error clipped to 0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    controller.update(kl=5.4, steps=100)  # error -0.1
    assert controller.value == pytest.approx(0.1 * 1.02 * 0.9)


def test_running_mean_std():
    exact = RunningMeanStd(beta=None)
    exact.update(torch.tensor([1.0, 3.0]))
    exact.update(torch.tensor([5.0, 7.0, 9.0, 11.0]))
    values = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0, 11.0])
    assert exact.mean == pytest.approx(values.mean().item())
    assert exact.std == pytest.approx(values.std(unbiased=False).item() + 1e-5)
    torch.testing.assert_close(exact.denormalize(exact.normalize(values)), values)
    ema = RunningMeanStd(beta=0.5)
    ema.update(torch.tensor([2.0]))
    ema.update(torch.tensor([4.0]))
    assert ema.mean == pytest.approx(3.0)


def test_ppo_policy_loss_clips_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, stats = ppo_policy_loss(new, old, adv, mask, clip=0.2)
    # max(-A r, -A clip(r)): 1.5 -> max(-1.5, -1.2) = -1.2; 0.5 -> max(-0.5, -0.8) = -0.5; 1.1 -> 2.2
    assert loss.item() == pytest.approx(-1.2 - 0.5 + 2.2)  # the sum: the step divides by its token count
    assert stats["clip_fraction"] == pytest.approx(2)  # clipped tokens
    weighted, _ = ppo_policy_loss(new, old, adv, mask, clip=0.2, weights=torch.tensor([[2.0, 1.0, 0.5]]))
    assert weighted.item() == pytest.approx(-2.4 - 0.5 + 1.1)  # truncated importance weights per token


def test_value_loss_clipped():
    old, new, ret = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0])
    mask = torch.ones(1)
    # clipped prediction 1.2 -> (1.8)^2 = 3.24 beats (1)^2
    assert value_loss(new, old, ret, mask, clip=0.2).item() == pytest.approx(0.5 * 3.24)
    assert value_loss(new, old, ret, mask, clip=None).item() == pytest.approx(0.5 * 1.0)


def test_group_baselines():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])
    grpo = group_advantages(rewards, 3)
    first = torch.tensor([1.0, 0.0, 0.0])
    torch.testing.assert_close(grpo[:3], (first - first.mean()) / (first.std() + 1e-6))
    torch.testing.assert_close(group_advantages(rewards, 3, scale=False)[3:], torch.tensor([-2 / 3, 1 / 3, 1 / 3]))
    torch.testing.assert_close(leave_one_out_advantages(rewards, 3)[:3], torch.tensor([1.0, -0.5, -0.5]))


def test_entropy_and_logprobs_of_uniform_logits():
    logprobs, entropy = next_token_logprobs(torch.zeros(1, 3, 4), torch.tensor([[0, 1, 2]]), entropy=True)
    torch.testing.assert_close(entropy, torch.full((1, 2), math.log(4)))
    torch.testing.assert_close(logprobs, torch.full((1, 2), -math.log(4)))
