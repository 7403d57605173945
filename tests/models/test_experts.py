"""Expert parallelism: experts split over data-parallel ranks, tokens exchanged inside the group;
logits and greedy generation against HF with every rank holding its own prompts."""

import pytest
import torch

from tests.distributed import run_ranks
from tests.models.test_inference import IDS, MASK

EP_LAYOUTS = [("d2e2", (0, 1)), ("d2t2e2", (0, 1, 2, 3)), ("d4e2", (0, 1, 2, 3)), ("d4e4", (0, 1, 2, 3))]


def _ep_model(preset, strategy, ranks):
    import torch.distributed as dist
    from transformers import AutoConfig

    from ds_realloc.layout.layout import Layout
    from ds_realloc.layout.mesh import DeviceMesh, parse_strategy
    from ds_realloc.layout.model import model_spec
    from ds_realloc.models.inference import inference_model, parallel_groups
    from ds_realloc.models.presets import resolve_model_path
    from ds_realloc.models.shards import load_shards

    path = resolve_model_path(preset)
    config = AutoConfig.from_pretrained(path)
    layout = Layout(model_spec(config), DeviceMesh(ranks), parse_strategy(strategy, len(ranks)), fused=True)
    rank = dist.get_rank()
    weights = load_shards(path, layout, rank, torch.float32, "cpu", "model")
    return path, layout, inference_model(config, weights, *parallel_groups(layout, rank))


def _hf_greedy_one(reference, prompt, max_new_tokens, eos):
    out = reference.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=reference.config.pad_token_id)[0, len(prompt):].tolist()
    return out[:out.index(eos) + 1] if eos in out else out  # (eos None: never stops early)


def _ep_parity(rank, world, preset):
    """Each data-parallel rank scores its own row (different padding) and greedily continues its own
    prompts; one rank's prompts end early (an EOS HF also stops at), so the group runs in lockstep."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from ds_realloc.models.attention import attention_mask, positions_of
    from ds_realloc.models.generate import GenerationConfig, completion_ids, generate
    from ds_realloc.utils.dist import group_of
    from tests.models.test_inference import _full_logits

    results = {}
    for strategy, ranks in EP_LAYOUTS:
        if rank not in ranks:
            dist.barrier()
            continue
        path, layout, model = _ep_model(preset, strategy, ranks)
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        dp = layout.coords(rank)[0]
        row = dp % IDS.shape[0]
        ids, mask = IDS[row:row + 1], MASK[row:row + 1]
        with torch.no_grad():
            hidden = model.hidden(ids, positions_of(mask), attention_mask(mask.bool(), torch.arange(ids.shape[1])))
            diff = (_full_logits(model, hidden) - reference(input_ids=ids, attention_mask=mask).logits)[mask.bool()]
        prompts = [[5 + dp, 17, 99, 3][:2 + dp % 3], [9, 8, 7 + dp]]
        stopper = _hf_greedy_one(reference, prompts[0], 12, eos=None)[2]  # rank 0's first prompt ends at its 3rd token
        stopper = torch.tensor([stopper])
        dist.broadcast(stopper, src=ranks[0], group=group_of(ranks))
        eos = int(stopper)
        ours = generate(model, prompts, GenerationConfig(max_new_tokens=12, greedy=True), [eos], 0)
        want = [_hf_greedy_one(reference, p, 12, eos) for p in prompts]
        results[strategy] = (diff.abs().max().item(), [completion_ids(ours, i) for i in range(2)] == want,
                             [len(w) for w in want])
        dist.barrier()
    return results


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen3-moe"])
def test_expert_parallel_logits_and_greedy_generation_equal_hf(preset):
    results = run_ranks(_ep_parity, 4, preset, timeout=300)
    assert set(results[0]) == {s for s, _ in EP_LAYOUTS}
    for r in results:
        for strategy, (diff, same, lengths) in r.items():
            assert diff <= 1e-4 and same, (strategy, r)
    assert results[0]["d2e2"][2][0] == 3 and results[1]["d2e2"][2][0] == 12  # one rank finished first


def test_expert_parallel_rejections():
    from transformers import AutoConfig

    from ds_realloc.layout.layout import Layout
    from ds_realloc.layout.mesh import DeviceMesh, parse_strategy
    from ds_realloc.layout.model import model_spec
    from ds_realloc.models.presets import resolve_model_path
    from ds_realloc.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="e2 must divide d3"):
        parse_strategy("d3e2")
    moe = model_spec(AutoConfig.from_pretrained(resolve_model_path("tiny-mixtral")))  # 4 experts
    with pytest.raises(ConfigError, match="e8 does not divide the 4 experts"):
        Layout(moe, DeviceMesh(tuple(range(8))), parse_strategy("d8e8"), fused=True).buffers(0)
    dense = model_spec(AutoConfig.from_pretrained(resolve_model_path("tiny-llama")))
    with pytest.raises(ConfigError, match="needs a mixture-of-experts model"):
        Layout(dense, DeviceMesh((0, 1)), parse_strategy("d2e2"))
    assert str(parse_strategy("e2d2")) == "d2t1p1e2" and str(parse_strategy("d2")) == "d2t1p1"


def _local_logits(path, ids):
    """Logits of our single-rank inference model on an HF folder (no process group needed)."""
    from transformers import AutoConfig

    from ds_realloc.layout.layout import Layout
    from ds_realloc.layout.mesh import DeviceMesh, Strategy
    from ds_realloc.layout.model import model_spec
    from ds_realloc.models.attention import attention_mask, positions_of
    from ds_realloc.models.inference import inference_model
    from ds_realloc.models.shards import load_shards
    from ds_realloc.models.tp import TensorParallel

    config = AutoConfig.from_pretrained(path)
    layout = Layout(model_spec(config), DeviceMesh((0,)), Strategy(), fused=True)
    model = inference_model(config, load_shards(path, layout, 0, torch.float32, "cpu", "model"), TensorParallel())
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden = model.hidden(ids, positions_of(mask), attention_mask(mask.bool(), torch.arange(ids.shape[1])))
        return model.logits(hidden)
