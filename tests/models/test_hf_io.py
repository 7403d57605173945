import json

import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from ds_realloc.models.hf_io import CheckpointReader, ShardedWriter
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
