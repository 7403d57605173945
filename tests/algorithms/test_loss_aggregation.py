"""Losses aggregate exactly as named, whatever the split: the same 8 rows through a real DeepSpeed
engine as 1 rank x 8, 2 ranks x 4 and 2 ranks x 2 micro-batches of 2 give the same gradient."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_ranks

ROWS = 8
POLICY_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _rows():
    """Eight rows of different prompt and completion lengths, with fixed targets."""
    from ds_realloc.data.datasets import PairSample, PromptSample, TokenizedSequence

    g = torch.Generator().manual_seed(7)
    prompts, completions = [], []
    for i in range(ROWS):
        prompts.append(PromptSample(f"p{i}", tuple(torch.randint(3, 250, (2 + i % 3,), generator=g).tolist()), None))
        completions.append(tuple(torch.randint(3, 250, (1 + (5 * i) % 7,), generator=g).tolist()))
    lengths = [len(c) for c in completions]
    policy = {"prompt": prompts, "completion": completions, "truncated": [False] * ROWS, "score": [1.0] * ROWS,
              "gen_logprobs": [-torch.rand(n, generator=g) * 6 for n in lengths],
              "advantages": [torch.randn(n, generator=g) for n in lengths], "kl": [torch.zeros(n) for n in lengths],
              "kl_coef": [0.0] * ROWS, "values": [torch.randn(n + 1, generator=g) for n in lengths],
              "returns": [torch.randn(n, generator=g) for n in lengths]}

    def seq(k):
        ids = tuple(torch.randint(3, 250, (3 + k,), generator=g).tolist())
        return TokenizedSequence(ids, (0,) * 2 + (1,) * (len(ids) - 2))

    seqs = [seq(i % 4) for i in range(ROWS)]
    pairs = [PairSample(seq(i % 3), seq((i + 1) % 4)) for i in range(ROWS)]
    dpo = {"pair": pairs, "ref_chosen_logp": (-torch.rand(ROWS, generator=g) * 20).tolist(),
           "ref_rejected_logp": (-torch.rand(ROWS, generator=g) * 20).tolist()}
    return policy, {"seq": seqs}, dpo


def _gradient(engine) -> torch.Tensor:
    grads = torch.cat([p.grad.reshape(-1) for p in engine.module.parameters() if p.grad is not None]).clone()
    for p in engine.module.parameters():
        p.grad = None
    return grads


def _engine(head: str, micro: int, world: int):
    from ds_realloc.engine.config import EngineConfig, OptimConfig
    from ds_realloc.engine.ds_config import BatchGeometry, train_ds_config
    from ds_realloc.engine.factory import build_train_engine
    from ds_realloc.models.presets import resolve_model_path

    per_rank = ROWS // world
    config = train_ds_config(EngineConfig(zero_stage=0, dtype="fp32"), OptimConfig(grad_clip=0.0),
                             BatchGeometry(micro, per_rank // micro, world), total_steps=1)
    engine = build_train_engine(resolve_model_path("tiny-llama"), head, config, pad_token_id=258)
    engine.step = lambda *args, **kwargs: None  # keep the accumulated (all-reduced) gradient to read it
    return engine


def _gradients_at(rank: int, world: int, micro: int) -> dict[str, torch.Tensor]:
    from ds_realloc.algorithms.dpo import DPOInterface
    from ds_realloc.algorithms.policy import CriticTrainInterface, PolicyConfig, PolicyTrainInterface
    from ds_realloc.algorithms.sft import SFTInterface

    policy, sft, dpo = _rows()
    per_rank = ROWS // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)

    def share(batch):
        return {key: values[mine] for key, values in batch.items()}

    out = {}
    actor = _engine("lm", micro, world)
    for agg in POLICY_AGGS:
        cfg = PolicyConfig(old_logprobs="rollout", loss_agg=agg, clip=0.2)
        PolicyTrainInterface(cfg, micro, 258, temperature=0.7, norm_tokens=8).train_step(actor, share(policy))
        out[f"policy {agg}"] = _gradient(actor)
    SFTInterface(micro, 258).train_step(actor, share(sft))
    out["sft"] = _gradient(actor)
    DPOInterface(micro, 258, beta=0.1).train_step(actor, share(dpo))
    out["dpo"] = _gradient(actor)
    critic = _engine("value", micro, world)
    for agg in ("token-mean", "seq-mean-token-mean"):
        CriticTrainInterface(PolicyConfig(loss_agg=agg), micro, 258, norm_tokens=8).train_step(critic, share(policy))
        out[f"critic {agg}"] = _gradient(critic)
    return out


def _gradients(rank: int, world: int, micros: tuple[int, ...]) -> list[dict[str, torch.Tensor]]:
    return [_gradients_at(rank, world, micro) for micro in micros]


@pytest.fixture(scope="module")
def splits():
    one = run_ranks(_gradients, 1, (8,), timeout=240)[0][0]
    two_by_4, two_by_2 = run_ranks(_gradients, 2, (4, 2), timeout=240)[0]  # both splits in one pair of processes
    return one, two_by_4, two_by_2


@pytest.mark.parametrize("loss", [f"policy {a}" for a in POLICY_AGGS] + ["sft", "dpo", "critic token-mean",
                                                                           "critic seq-mean-token-mean"])
def test_the_gradient_does_not_depend_on_the_split(splits, loss):
    reference = splits[0][loss]
    assert reference.norm() > 0
    for other in splits[1:]:
        assert ((other[loss] - reference).norm() / reference.norm()).item() < 1e-6, loss
