import math

import torch
import torch.nn.functional as F

from ds_realloc.algorithms.functional import (bradley_terry_loss, dpo_loss, masked_mean, sequence_logprobs,
                                              sft_loss, token_logprobs)


def _case(seed=0, batch=3, seq=6, vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=g)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    return logits, ids, mask


def test_token_logprobs_equal_log_softmax_gather():
    logits, ids, _ = _case()
    expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, ids), expected)
    torch.testing.assert_close(token_logprobs(logits.bfloat16(), ids),
                               torch.log_softmax(logits.bfloat16().float()[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1))


def test_sft_loss_equals_cross_entropy_over_answer_tokens():
    logits, ids, mask = _case()
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(sft_loss(logits, ids, mask), expected)


def test_sequence_logprobs_sum_answer_tokens():
    logits, ids, mask = _case()
    per_token = token_logprobs(logits, ids)
    expected = torch.stack([per_token[b][mask[b, 1:].bool()].sum() for b in range(3)])
    torch.testing.assert_close(sequence_logprobs(logits, ids, mask), expected)


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert masked_mean(values, mask).item() == 2.0
    torch.testing.assert_close(masked_mean(values, mask, dim=1), torch.tensor([2.0, 0.0]))


def test_bradley_terry_by_hand():
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor([math.log(1 + math.exp(-1.0)), math.log(2.0)]))


def test_dpo_loss_by_hand():
    beta = 0.5
    loss, chosen, rejected = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                                      torch.tensor([-2.5]), beta)
    # rewards: 0.5 * (-1 + 2) = 0.5 and 0.5 * (-3 + 2.5) = -0.25; loss = log(1 + exp(-(0.5 + 0.25)))
    torch.testing.assert_close(chosen, torch.tensor([0.5]))
    torch.testing.assert_close(rejected, torch.tensor([-0.25]))
    torch.testing.assert_close(loss, torch.tensor([math.log1p(math.exp(-0.75))]))
