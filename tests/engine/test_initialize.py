"""`ds_realloc.initialize` as DeepSpeed-Chat's step-3 trainer uses its actor: generate through
`actor.module.generate(...)` / `actor.generate(...)`, train, generate again."""

import pytest

from tests.distributed import run_ranks

PAD = 258  # the tiny presets' pad token
PRESETS = ("tiny-llama", "tiny-opt", "tiny-mixtral")  # GQA, DeepSpeed-Chat's OPT, a mixture of experts


def _ds_config(tp: int | None, release: bool = False) -> dict:
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_optimization": {"stage": 3}, "steps_per_print": 10 ** 6}
    if tp is not None:
        config["hybrid_engine"] = {"enabled": True, "inference_tp_size": tp, "release_inference_cache": release,
                                   "max_out_tokens": 64, "pin_parameters": True}
    return config


def _model(preset: str = "tiny-llama"):
    from transformers import AutoModelForCausalLM

    from ds_realloc.models.presets import resolve_model_path

    return AutoModelForCausalLM.from_pretrained(resolve_model_path(preset)).float()


def _prompts(rank: int):
    """Left-padded prompts of different lengths, a different batch on each rank."""
    import torch

    rows = [[5 + rank, 17, 99, 3, 42][:4 + rank], [9, 8, 7 + rank], [11, 12, 13, 14, 15, 16][:5 + rank]]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    return ids, (ids != PAD).long()


def _reference(engine, preset, ids, mask, **kwargs):
    """HF `generate` on this rank's batch alone, on the engine's gathered fp32 weights."""
    import deepspeed

    model = _model(preset)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        missing, unexpected = model.load_state_dict(
            {n: p.detach().clone() for n, p in engine.module.named_parameters()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # a tied head is the embedding
    model.tie_weights()
    return model.generate(input_ids=ids, attention_mask=mask, **kwargs)


def _train_step(engine, ids, mask):
    loss = engine(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    engine.backward(loss)
    engine.step()
    return float(loss)


def _parity(rank: int, world: int) -> dict:
    import gc
    import itertools
    import weakref

    import torch
    import torch.distributed as dist

    import ds_realloc
    from ds_realloc.engine.hybrid import HybridEngine

    copies = []
    original = HybridEngine._weights

    def recording(self, layout, version, stats):  # a weak reference to every inference copy made
        placed, buffers = original(self, layout, version, stats)
        copies.append(weakref.ref(next(iter(buffers.values()))))
        return placed, buffers

    HybridEngine._weights = recording
    ids, mask = _prompts(rank)
    results = {}
    for preset, tp, release in itertools.product(PRESETS, (1, 2), (True, False)):
        torch.manual_seed(0)
        model = _model(preset)
        engine, *_ = ds_realloc.initialize(model=model, model_parameters=model.parameters(),
                                           config=_ds_config(tp, release))
        # an EOS that greedy decoding reaches early in some rows (the same id on every rank)
        first = engine.module.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                       pad_token_id=PAD, synced_gpus=True)
        eos = [None] * world
        dist.all_gather_object(eos, int(first[0, ids.shape[1] + 1]))
        keywords = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=eos[0])
        for when in ("before", "after"):
            ours = engine.module.generate(ids, attention_mask=mask, **keywords)
            again = engine.generate(ids, attention_mask=mask, **keywords)
            gc.collect()
            kept = copies[-1]() is not None
            expected = _reference(engine, preset, ids, mask, **keywords)
            results[(preset, tp, release, when)] = (ours, again, expected, kept)
            if when == "before":
                _train_step(engine, ids, mask)
                gc.collect()
                results[(preset, tp, release, "kept after step")] = copies[-1]() is not None
    return results


@pytest.mark.slow
def test_generate_equals_hf_generate_before_and_after_a_training_step():
    import torch

    ended_early = []
    for rank, results in enumerate(run_ranks(_parity, 2, timeout=600)):
        assert len(results) == len(PRESETS) * 2 * 2 * 3
        for (preset, tp, release, when), value in results.items():
            case = (rank, preset, tp, release, when)
            if when == "kept after step":
                assert value is False, case  # a kept copy never survives an optimizer step
                continue
            ours, again, expected, kept = value
            assert torch.equal(ours, expected), (case, ours, expected)
            assert torch.equal(again, expected), case
            assert kept is (not release), case
            ended_early.append(bool((expected[:, -1] == PAD).any()))
    assert any(ended_early)  # some rows stopped at EOS while others went on


def _disabled(rank: int, world: int) -> tuple:
    import deepspeed
    import torch

    import ds_realloc

    ids, mask = _prompts(0)
    losses = {}
    for name, initialize in (("deepspeed", deepspeed.initialize), ("ds_realloc", ds_realloc.initialize)):
        torch.manual_seed(0)
        model = _model()
        config = _ds_config(None)
        config["hybrid_engine"] = {"enabled": False}
        engine, *_ = initialize(model=model, model_parameters=model.parameters(), config=config)
        losses[name] = [_train_step(engine, ids, mask) for _ in range(2)]
        losses[name + "_class"] = type(engine).__name__
    return losses


@pytest.mark.slow
def test_disabled_is_exactly_deepspeed():
    for losses in run_ranks(_disabled, 2, timeout=300):
        assert losses["ds_realloc_class"] == losses["deepspeed_class"] == "DeepSpeedEngine"
        assert losses["ds_realloc"] == losses["deepspeed"]  # bitwise


def test_bad_hybrid_engine_settings_are_named():
    from ds_realloc.engine.initialize import GENERATE_KEYWORDS, hybrid_settings
    from ds_realloc.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=r"ds.json: hybrid_engine.bogus: Extra inputs are not permitted"):
        hybrid_settings({"enabled": True, "bogus": 1}, "ds.json")
    with pytest.raises(ConfigError, match=r"hybrid_engine.max_out_tokens"):
        hybrid_settings({"enabled": True, "max_out_tokens": 0}, "ds.json")
    assert hybrid_settings({"enabled": True, "tp_gather_partition_size": 4}, "x").tp == 1
    assert "synced_gpus" in GENERATE_KEYWORDS


def test_unmerged_adapters_and_unknown_generate_keywords_are_named():
    import torch
    from torch import nn

    from ds_realloc.engine.initialize import HybridSurface, _check_no_adapters
    from ds_realloc.utils.errors import ConfigError, ModelError

    model = nn.Module()
    model.lora_A = nn.Linear(2, 2)
    with pytest.raises(ModelError, match=r"LoRA adapters \(lora_A.weight, ...\).*merge_and_unload"):
        _check_no_adapters(model)
    with pytest.raises(ConfigError, match="generate: keyword 'num_beams' is not supported; supported: max_new_tokens"):
        HybridSurface.generate(None, torch.zeros(1, 2, dtype=torch.long), num_beams=2)
