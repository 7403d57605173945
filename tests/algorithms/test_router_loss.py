"""The router's load-balancing loss in MoE training: the step's gradient is exactly that of the loss
plus coef x the units-weighted mean of the micro-batches' HF router losses, and it is reported."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_ranks

PAD = 258
COEF = 0.5  # large, so that the router term visibly moves the gradient


def _seqs():
    from ds_realloc.data.datasets import TokenizedSequence

    g = torch.Generator().manual_seed(3)
    seqs = []
    for k in range(4):
        ids = tuple(torch.randint(3, 250, (5 + 2 * k,), generator=g).tolist())
        seqs.append(TokenizedSequence(ids, (0,) * 3 + (1,) * (len(ids) - 3)))
    return seqs


def _engine_gradients(rank: int, world: int, coef: float):
    """SFT on 4 rows in 2 micro-batches of tiny-mixtral: the gradient and metrics of our step."""
    from ds_realloc.algorithms.sft import SFTInterface
    from ds_realloc.engine.config import EngineConfig, OptimConfig
    from ds_realloc.engine.ds_config import BatchGeometry, train_ds_config
    from ds_realloc.engine.factory import build_train_engine
    from ds_realloc.models.presets import resolve_model_path

    config = train_ds_config(EngineConfig(zero_stage=0, dtype="fp32"), OptimConfig(grad_clip=0.0),
                             BatchGeometry(2, 2, 1), total_steps=1)
    engine = build_train_engine(resolve_model_path("tiny-mixtral"), "lm", config, pad_token_id=PAD,
                                router_aux_loss_coef=coef)
    engine.step = lambda *args, **kwargs: None  # keep the accumulated gradient to read it
    metrics = SFTInterface(2, PAD).train_step(engine, {"seq": _seqs()})
    grads = {name: p.grad.clone() for name, p in engine.module.named_parameters() if p.grad is not None}
    return grads, metrics


def _reference():
    """The same step by hand with HF's own forward and `aux_loss`."""
    from transformers import AutoModelForCausalLM

    from ds_realloc.algorithms.functional import token_logprobs
    from ds_realloc.data.datasets import pad_sequences
    from ds_realloc.models.presets import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-mixtral"), dtype=torch.float32)
    seqs = _seqs()
    total_units = sum(sum(s.loss_mask[1:]) for s in seqs)
    loss, weighted_aux = 0.0, 0.0
    for rows in (slice(0, 2), slice(2, 4)):
        t = pad_sequences(seqs[rows], PAD)
        out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], output_router_logits=True)
        units = float(t["loss_mask"][:, 1:].sum())
        nll = -(token_logprobs(out.logits, t["input_ids"]) * t["loss_mask"][:, 1:]).sum()
        loss = loss + (nll + COEF * units * out.aux_loss) / total_units
        weighted_aux += float(out.aux_loss.detach()) * units
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}, weighted_aux / total_units


@pytest.fixture(scope="module")
def steps():
    with_router = run_ranks(_engine_gradients, 1, COEF, timeout=240)[0]
    without = run_ranks(_engine_gradients, 1, 0.0, timeout=240)[0]
    return with_router, without


def test_the_router_loss_is_in_the_gradient_aggregated_like_the_loss(steps):
    (grads, metrics), (plain, plain_metrics) = steps
    reference, mean_aux = _reference()
    assert set(grads) == set(reference)
    for name, grad in grads.items():
        assert torch.allclose(grad, reference[name], rtol=1e-5, atol=1e-7), name
    total, count = metrics["router_aux_loss"]
    assert total / count == pytest.approx(mean_aux, rel=1e-6) and mean_aux > 1.5  # top-k = 2 if balanced
    router = "model.layers.0.mlp.gate.weight"
    assert (grads[router] - plain[router]).norm() > 0.1 * plain[router].norm()  # the term is really there
    assert "router_aux_loss" not in plain_metrics  # coef 0: no router loss


def test_which_models_carry_a_router_loss_and_its_default_weight():
    from transformers import AutoConfig, AutoModelForCausalLM

    from ds_realloc.models.presets import resolve_model_path
    from ds_realloc.models.router_loss import router_loss_for

    def model(name):
        config = AutoConfig.from_pretrained(resolve_model_path(name))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)

    moe = model("tiny-qwen3-moe")
    assert router_loss_for(moe, "lm", None).coef == moe.config.router_aux_loss_coef == 0.001  # HF's default
    assert router_loss_for(moe, "lm", 0.02).coef == 0.02
    assert router_loss_for(moe, "lm", 0.0) is None and router_loss_for(moe, "value", None) is None
    assert router_loss_for(model("tiny-llama"), "lm", 0.02) is None
