"""Loading HF folders into DeepSpeed engines: partitions read in place, outputs equal to HF's."""

import pytest
import torch

from tests.distributed import run_ranks

INPUT_IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 250, 11], [9, 8, 7, 6, 5, 4, 258, 258]])
MASK = torch.tensor([[1] * 8, [1] * 6 + [0, 0]])


def _engine(path, head, stage, dtype, offload_param=False):
    from ds_realloc.engine.config import EngineConfig, OptimConfig
    from ds_realloc.engine.ds_config import BatchGeometry, train_ds_config
    from ds_realloc.engine.factory import build_train_engine

    import torch.distributed as dist

    config = train_ds_config(EngineConfig(zero_stage=stage, dtype=dtype, offload_param=offload_param),
                             OptimConfig(), BatchGeometry(1, 1, dist.get_world_size()), total_steps=1)
    return build_train_engine(path, head, config, pad_token_id=258)


def _check_partitions(engine, path) -> int:
    """Every ZeRO-3 partition is the rank's flat slice of the checkpoint tensor (padding zeroed)."""
    import torch.distributed as dist

    from ds_realloc.models.hf_io import CheckpointReader

    reader = CheckpointReader(path)
    hf = engine.module
    checked = 0
    for name, param in hf.named_parameters():
        key = reader.resolve(name, hf.base_model_prefix)
        flat = reader.read(key).reshape(-1).to(param.ds_tensor.dtype)
        size = param.ds_tensor.numel()
        start = dist.get_rank(param.ds_process_group) * size
        part = param.ds_tensor.detach().cpu()
        valid = max(min(size, flat.numel() - start), 0)
        assert torch.equal(part[:valid], flat[start:start + valid]), name
        assert not part[valid:].any(), name
        checked += 1
    return checked


def _logits_match_hf(rank, world, preset):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ds_realloc.engine.loading import VALUE_HEAD_SEED, _new_head_values
    from ds_realloc.models.presets import resolve_model_path

    path = resolve_model_path(preset)
    diffs = {}
    for stage in (0, 3):
        for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            engine = _engine(path, "lm", stage, dtype, offload_param=(stage == 3 and dtype == "fp32"))
            if stage == 3:
                assert _check_partitions(engine, path) > 0
            with torch.no_grad():
                ours = engine(input_ids=INPUT_IDS, attention_mask=MASK).logits.float()
                reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
                expected = reference(input_ids=INPUT_IDS, attention_mask=MASK).logits.float()
            diffs[(stage, dtype)] = (ours - expected)[MASK.bool()].abs().max().item()
    engine = _engine(path, "value", 3, "fp32")
    with torch.no_grad():
        values = engine(input_ids=INPUT_IDS, attention_mask=MASK)
        reference = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        reference.score.weight.copy_(_new_head_values(reference.score.weight.shape, VALUE_HEAD_SEED))
        backbone = getattr(reference, reference.base_model_prefix)
        expected = reference.score(backbone(input_ids=INPUT_IDS, attention_mask=MASK).last_hidden_state).squeeze(-1)
    diffs["value"] = (values - expected)[MASK.bool()].abs().max().item()
    return diffs


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"])
def test_zero3_and_replicated_models_equal_hf(preset):
    for rank_diffs in run_ranks(_logits_match_hf, 2, preset):
        for case, diff in rank_diffs.items():
            tolerance = 2e-2 if "bf16" in case else 1e-5
            assert diff <= tolerance, (case, diff)


def _missing_weight(rank, world, path):
    from ds_realloc.utils.errors import ModelError

    with pytest.raises(ModelError, match="the checkpoint has no tensor for parameter 'lm_head.weight'"):
        _engine(path, "lm", 3, "fp32")


def test_missing_weights_are_named(tmp_path):
    """A reward-model folder (no lm_head) cannot be loaded as an untied language model."""
    from safetensors.torch import load_file, save_file

    from ds_realloc.models.presets import resolve_model_path

    source = resolve_model_path("tiny-llama")
    for item in source.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    weights = load_file(tmp_path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    run_ranks(_missing_weight, 2, tmp_path)
