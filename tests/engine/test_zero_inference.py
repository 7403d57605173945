"""DeepSpeed-Chat's mechanism (the baseline): gather-once + HF generate and ZeRO-3 forwards give what
our reallocated inference gives, so the benchmarks compare the same work."""

import torch

from tests.distributed import run_ranks


def _both_ways(rank, world):
    from transformers import AutoConfig

    from ds_realloc.engine.config import EngineConfig, OptimConfig
    from ds_realloc.engine.ds_config import BatchGeometry, frozen_ds_config, train_ds_config
    from ds_realloc.engine.factory import build_frozen_model
    from ds_realloc.engine.hybrid import HybridEngine
    from ds_realloc.engine.zero_inference import ZeroInferenceCall
    from ds_realloc.layout.mesh import DeviceMesh, Strategy
    from ds_realloc.models.generate import GenerationConfig
    from ds_realloc.models.inference import InferenceCall
    from ds_realloc.models.presets import resolve_model_path

    path = resolve_model_path("tiny-llama")
    train = train_ds_config(EngineConfig(zero_stage=3, dtype="fp32"), OptimConfig(), BatchGeometry(1, 1, world), 1)
    frozen = build_frozen_model(path, "lm", frozen_ds_config(train, offload=False), offload=False)
    mesh = DeviceMesh(tuple(range(world)))
    hybrid = HybridEngine(frozen.module, AutoConfig.from_pretrained(path), False, mesh, torch.float32)
    theirs = ZeroInferenceCall(frozen.module, frozen._engine)
    prompts = [[5, 17, 99, 3], [9, 8, 7, 6, 5, 4]]
    greedy = GenerationConfig(max_new_tokens=6, greedy=True)
    ids = torch.tensor([[258, 258, 5, 17, 99, 3, 11, 12], [9, 8, 7, 6, 5, 4, 13, 14]])
    mask = (ids != 258).long()
    with hybrid.placed(hybrid.layout(mesh, Strategy(dp=world))) as placement:
        ours = InferenceCall(placement.model)
        a, ours_lp = ours.generate(prompts, greedy, [2], 258), ours.logprobs(ids, mask, 2, 0.7)
    b = theirs.generate(prompts, greedy, [2], 258)
    again = theirs.generate(prompts, greedy, [2], 258)  # the ZeRO-3 hooks came back: it works twice
    assert torch.equal(again.tokens, b.tokens)
    return a.tokens, b.tokens, a.logprobs, b.logprobs, ours_lp, theirs.logprobs(ids, mask, 2, 0.7)


def test_zero3_mechanism_matches_reallocated_inference():
    for ours_tokens, theirs_tokens, ours_gen, theirs_gen, ours_lp, theirs_lp in run_ranks(_both_ways, 2, timeout=120):
        assert torch.equal(ours_tokens, theirs_tokens)  # greedy: the same completions
        torch.testing.assert_close(ours_gen.float(), theirs_gen.float(), rtol=0, atol=1e-4)
        torch.testing.assert_close(ours_lp.float(), theirs_lp.float(), rtol=0, atol=1e-4)
