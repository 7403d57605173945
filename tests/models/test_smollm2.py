"""The embedded default: the converted HF folder is the GGUF model, exactly."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_realloc.models.presets import EMBEDDED_DEFAULT, resolve_model_path
from ds_realloc.models.smollm2 import gguf_file


@pytest.mark.slow
def test_converted_folder_matches_the_gguf_model():
    path = resolve_model_path(EMBEDDED_DEFAULT)
    ours = AutoModelForCausalLM.from_pretrained(path)
    assert type(ours).__name__ == "LlamaForCausalLM" and not getattr(ours, "is_quantized", False)
    config = ours.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size, config.tie_word_embeddings) == (30, 9, 3, 49152, True)
    source = gguf_file()
    reference = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, reference(ids).logits)
