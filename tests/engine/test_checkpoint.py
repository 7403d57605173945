"""HF checkpoints written from ZeRO-3 load in plain transformers and give the trained model's outputs."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tests.distributed import run_ranks
from tests.engine.test_loading import INPUT_IDS, MASK, _engine


def _train_one_step(engine, head):
    from ds_realloc.algorithms.functional import sft_loss
    from ds_realloc.models.value_head import last_token_scores

    out = engine(input_ids=INPUT_IDS, attention_mask=MASK)
    if head == "lm":
        loss = sft_loss(out.logits, INPUT_IDS, MASK)
    else:
        loss = -last_token_scores(out, MASK).mean()
    engine.backward(loss)
    engine.step()


def _train_save(rank, world, preset, head, stage, out_dir):
    from transformers import AutoTokenizer

    from ds_realloc.engine.checkpoint import save_hf_model
    from ds_realloc.models.presets import resolve_model_path
    from ds_realloc.models.value_head import last_token_scores

    path = resolve_model_path(preset)
    engine = _engine(path, head, stage, "fp32")
    engine.optimizer.param_groups[0]["lr"] = 1e-2  # a visible change
    _train_one_step(engine, head)
    save_hf_model(engine.module, AutoTokenizer.from_pretrained(path), out_dir, max_shard_bytes=50_000)
    engine.eval()
    with torch.no_grad():
        out = engine(input_ids=INPUT_IDS, attention_mask=MASK)
    return out.logits if head == "lm" else last_token_scores(out, MASK)


@pytest.mark.parametrize("preset,stage", [("tiny-llama", 3), ("tiny-qwen2", 3), ("tiny-gpt2", 3), ("tiny-llama", 1)])
def test_language_model_checkpoint_gives_the_same_logits(tmp_path, preset, stage):
    from ds_realloc.models.presets import resolve_model_path

    ours = run_ranks(_train_save, 2, preset, "lm", stage, tmp_path)[0]
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1  # sharded, with an index
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    before = AutoModelForCausalLM.from_pretrained(resolve_model_path(preset))
    with torch.no_grad():
        logits = loaded(input_ids=INPUT_IDS, attention_mask=MASK).logits
        untrained = before(input_ids=INPUT_IDS, attention_mask=MASK).logits
    torch.testing.assert_close(logits[MASK.bool()], ours[MASK.bool()], rtol=0, atol=1e-5)
    assert (logits - untrained).abs().max() > 1e-3  # the step changed the weights that were saved


def test_reward_model_checkpoint_loads_as_sequence_classifier(tmp_path):
    ours = run_ranks(_train_save, 2, "tiny-llama", "value", 3, tmp_path)[0]
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert loaded.config.num_labels == 1 and loaded.config.architectures == ["LlamaForSequenceClassification"]
    with torch.no_grad():
        scores = loaded(input_ids=INPUT_IDS, attention_mask=MASK).logits.squeeze(-1)
    torch.testing.assert_close(scores, ours, rtol=0, atol=1e-5)


def _offload_losses(rank, world, offload):
    from ds_realloc.algorithms.functional import sft_loss
    from ds_realloc.engine.config import EngineConfig, OptimConfig
    from ds_realloc.engine.ds_config import BatchGeometry, train_ds_config
    from ds_realloc.engine.factory import build_train_engine
    from ds_realloc.models.presets import resolve_model_path

    config = train_ds_config(EngineConfig(zero_stage=3, offload_param=offload, offload_optimizer=offload),
                             OptimConfig(lr=1e-3), BatchGeometry(2, 1, world), total_steps=10)
    engine = build_train_engine(resolve_model_path("tiny-llama"), "lm", config)
    losses = []
    for _ in range(4):
        loss = sft_loss(engine(input_ids=INPUT_IDS, attention_mask=MASK).logits, INPUT_IDS, MASK)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_zero_offload_trains_like_resident_zero3():
    """offload_param + offload_optimizer (DeepSpeedCPUAdam) follow the same loss curve as torch AdamW."""
    resident = run_ranks(_offload_losses, 2, False)[0]
    offloaded = run_ranks(_offload_losses, 2, True, timeout=600)[0]
    assert resident[-1] < resident[0] - 0.05
    torch.testing.assert_close(torch.tensor(offloaded), torch.tensor(resident), rtol=0, atol=1e-4)
