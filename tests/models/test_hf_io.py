import json

import torch
import pytest
from hypothesis import given, settings, strategies as st
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from ds_realloc.models.hf_io import CheckpointReader, ShardedWriter, save_hf_folder
from ds_realloc.models.presets import resolve_model_path


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 7), min_size=1, max_size=3), st.data())
def test_read_flat_equals_slicing_the_flattened_tensor(tmp_path_factory, shape, data):
    folder = tmp_path_factory.mktemp("ckpt")
    tensor = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    save_file({"w": tensor}, str(folder / "model.safetensors"))
    torch.save({"w": tensor}, folder / "pytorch_model.bin")
    start = data.draw(st.integers(0, tensor.numel()))
    end = data.draw(st.integers(start, tensor.numel()))
    expected = tensor.reshape(-1)[start:end]
    assert torch.equal(CheckpointReader(folder).read_flat("w", start, end), expected)
    (folder / "model.safetensors").unlink()
    assert torch.equal(CheckpointReader(folder).read_flat("w", start, end), expected)


def test_prefix_resolution():
    reader = CheckpointReader(resolve_model_path("tiny-gpt2"))
    stored = "transformer.h.0.attn.c_attn.weight"
    assert reader.resolve(stored, "transformer") == stored
    assert reader.resolve("h.0.attn.c_attn.weight", "transformer") == stored
    assert reader.resolve("score.weight", "transformer") is None


def test_sharded_writer_writes_an_index_hf_can_load(tmp_path):
    source = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-llama"))
    writer = ShardedWriter(tmp_path, max_shard_bytes=100_000)
    for name, tensor in source.state_dict().items():
        writer.add(name, tensor)
    files = writer.close()
    assert len(files) > 2 and files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(source.state_dict())
    source.config.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    # a smaller model written into the same folder replaces the shards
    writer = ShardedWriter(tmp_path)
    writer.add("x", torch.ones(3))
    assert [p.name for p in writer.close()] == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def _moe_config(model_type: str):
    from transformers import MixtralConfig, Qwen3MoeConfig

    dims = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                tie_word_embeddings=False)
    if model_type == "mixtral":
        return MixtralConfig(intermediate_size=48, num_local_experts=3, num_experts_per_tok=2, **dims)
    return Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=48, num_experts=3, num_experts_per_tok=2,
                          head_dim=8, **dims)


@pytest.mark.parametrize("model_type, published", [
    ("mixtral", ["model.layers.1.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.2.w1.weight",
                 "model.layers.1.block_sparse_moe.experts.2.w3.weight",
                 "model.layers.1.block_sparse_moe.experts.2.w2.weight"]),
    ("qwen3_moe", ["model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.2.gate_proj.weight",
                   "model.layers.1.mlp.experts.2.up_proj.weight", "model.layers.1.mlp.experts.2.down_proj.weight"]),
])
def test_fused_experts_are_written_and_read_under_their_published_names(tmp_path, model_type, published):
    """Our writer stores transformers' fused expert tensors as the per-expert tensors published
    checkpoints hold, the same names HF's own save_pretrained writes; transformers loads our folder
    back bit for bit, and our reader serves the fused tensors (whole, any flat range, strided spans)
    from HF's folder bit for bit."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_moe_config(model_type))
    live = model.state_dict()
    save_hf_folder(model, None, tmp_path / "ours")
    model.save_pretrained(tmp_path / "hf")
    ours, theirs = CheckpointReader(tmp_path / "ours"), CheckpointReader(tmp_path / "hf")
    assert ours.names() == theirs.names() and set(published) <= ours.names()
    assert not any(name.endswith(("gate_up_proj", "down_proj")) for name in ours.names())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").state_dict()
    assert sorted(loaded) == sorted(live) and all(torch.equal(loaded[name], live[name]) for name in live)
    for name, tensor in live.items():
        key = theirs.resolve(name, "model")
        assert theirs.shape(key) == tuple(tensor.shape) and torch.equal(theirs.read(key), tensor), name
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        flat = live[name].reshape(-1)
        n = flat.numel()
        for start, end in ((0, 1), (5, n - 7), (n // 3, n), (n - 1, n)):
            assert torch.equal(theirs.read_flat(name, start, end), flat[start:end])
        columns = live[name].shape[-1]
        spans = theirs.read_strided(name, 3, columns, columns // 2, n // columns - 1)
        assert torch.equal(spans, flat.as_strided((n // columns - 1, columns // 2), (columns, 1), 3))
