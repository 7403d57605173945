"""Named models: the embedded SmolLM2 default and tiny random presets, each materialised once as an
HF folder in the cache, so every command treats them like any other local HF path."""

from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, MixtralConfig,
                          OPTConfig, Qwen2Config, Qwen3MoeConfig)

from ds_realloc.models.registry import family_of
from ds_realloc.models.tokenizer import byte_level_tokenizer
from ds_realloc.utils.errors import ModelError
from ds_realloc.utils.logging import get_logger

logger = get_logger(__name__)

EMBEDDED_DEFAULT = "smollm2-135m-instruct"
_COMPLETE_MARK = ".ds_realloc_complete"


def cache_dir() -> Path:
    """Where converted and generated models live: $DS_REALLOC_CACHE or ~/.cache/ds_realloc."""
    return Path(os.environ.get("DS_REALLOC_CACHE", Path.home() / ".cache" / "ds_realloc"))


# ----------------------------------------------------------------------------------------------
# Tiny random presets (tests): heads divisible by 2 and 4, GQA where the family has it.

_TINY_SEED = 1234


def _tiny_dims(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),  # 260: divisible by 2 and 4, so the vocab splits for TP
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_llama_config(tokenizer) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                       **_tiny_dims(tokenizer))


def _tiny_qwen2_config(tokenizer) -> Qwen2Config:
    return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                       **_tiny_dims(tokenizer))


def _tiny_mistral_config(tokenizer) -> MistralConfig:
    return MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, sliding_window=None,
                         tie_word_embeddings=False, **_tiny_dims(tokenizer))


def _llama_100m_config(tokenizer) -> LlamaConfig:
    """~112M parameters (LLaMA shapes with GQA: 12 heads, 4 kv heads, vocab 32000) for benchmarks."""
    dims = {**_tiny_dims(tokenizer), "vocab_size": 32000}
    return LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12,
                       num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False, **dims)


def _mixtral_100m_config(tokenizer) -> MixtralConfig:
    """~115M parameters, ~58M active per token (8 experts, top-2; GQA: 8 heads, 4 kv heads; vocab 32000)
    for benchmarks."""
    dims = {**_tiny_dims(tokenizer), "vocab_size": 32000}
    return MixtralConfig(hidden_size=512, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=2048, sliding_window=None, tie_word_embeddings=False, **dims)


def _tiny_gpt2_config(tokenizer) -> GPT2Config:
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **_tiny_dims(tokenizer))


def _tiny_opt_config(tokenizer) -> OPTConfig:
    """OPT-350m's shape of model (DeepSpeed-Chat's critic): post-norm layers, embeddings narrower than
    the hidden size (project_in / project_out); `do_layer_norm_before=true` gives OPT-1.3b's."""
    return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                     max_position_embeddings=512, do_layer_norm_before=False, **_tiny_dims(tokenizer))


def _tiny_mixtral_config(tokenizer) -> MixtralConfig:
    """4 experts, top-2 (Mixtral's routing), GQA attention."""
    return MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
                         sliding_window=None, tie_word_embeddings=False, **_tiny_dims(tokenizer))


def _tiny_qwen3_moe_config(tokenizer) -> Qwen3MoeConfig:
    """4 experts, top-2 without renormalisation (Qwen3-MoE's default), q/k norms, and a dense middle
    layer (`mlp_only_layers`) between two sparse ones."""
    return Qwen3MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                          num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1], decoder_sparse_step=1,
                          max_position_embeddings=512, tie_word_embeddings=False, **_tiny_dims(tokenizer))


def _build_random(make_config: Callable) -> Callable[[Path], None]:
    def build(out_dir: Path) -> None:
        from ds_realloc.models.hf_io import save_hf_folder

        tokenizer = byte_level_tokenizer()
        config = make_config(tokenizer)
        torch.manual_seed(_TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        save_hf_folder(model, tokenizer, out_dir)

    return build


def _build_smollm2(out_dir: Path) -> None:
    from ds_realloc.models.smollm2 import convert_smollm2

    convert_smollm2(out_dir)


def _build_smollm2_moe(out_dir: Path) -> None:
    """SmolLM2 sparsely upcycled to Mixtral: 4 experts per layer, top-2, each a copy of the layer's MLP."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from ds_realloc.models.hf_io import save_hf_folder
    from ds_realloc.models.upcycle import upcycle

    dense_dir = materialise_preset(EMBEDDED_DEFAULT)
    dense = LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    moe = upcycle(dense, experts=4, top_k=2, seed=_TINY_SEED)
    moe.generation_config = dense.generation_config
    save_hf_folder(moe, AutoTokenizer.from_pretrained(dense_dir), out_dir)


PRESETS: dict[str, Callable[[Path], None]] = {
    EMBEDDED_DEFAULT: _build_smollm2,
    "smollm2-moe": _build_smollm2_moe,
    "tiny-llama": _build_random(_tiny_llama_config),
    "tiny-qwen2": _build_random(_tiny_qwen2_config),
    "tiny-mistral": _build_random(_tiny_mistral_config),
    "tiny-gpt2": _build_random(_tiny_gpt2_config),
    "tiny-opt": _build_random(_tiny_opt_config),
    "tiny-mixtral": _build_random(_tiny_mixtral_config),
    "tiny-qwen3-moe": _build_random(_tiny_qwen3_moe_config),
    "llama-100m": _build_random(_llama_100m_config),
    "mixtral-100m": _build_random(_mixtral_100m_config),
}


# ----------------------------------------------------------------------------------------------
# Resolution


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive file lock, so ranks that start together build a preset once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _loadable(folder: Path) -> str | None:
    """Why an HF folder does not load (config, tokenizer, every weight the config expects), or None.
    Cheap: reads the config and the safetensors headers, not the weights."""
    from transformers import AutoTokenizer

    from ds_realloc.models.hf_io import CheckpointReader

    try:
        config = AutoConfig.from_pretrained(folder)
        AutoTokenizer.from_pretrained(folder)
        with torch.device("meta"):
            expected = {n for n, _ in AutoModelForCausalLM.from_config(config).named_parameters()}
        reader = CheckpointReader(folder)  # the safetensors headers; fused experts as their published pieces
    except (OSError, ValueError, KeyError, ModelError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = {name for name in expected - tied if reader.resolve(name, "") is None}
    return f"no weights for {sorted(missing)[:3]}" if missing else None


_VERIFIED: set[tuple] = set()  # preset folders (as their files stood) this process has seen load


def _state(target: Path) -> tuple:
    """The folder's marker and weight files with their modification times: what a check vouches for."""
    files = sorted([target / _COMPLETE_MARK, *target.glob("*.safetensors")])
    return (target, *((f.name, f.stat().st_mtime_ns) for f in files if f.exists()))


def _complete(target: Path) -> bool:
    """Marked complete and loadable; the (cheap but not free) load check runs once per folder state."""
    if not (target / _COMPLETE_MARK).exists():
        return False
    state = _state(target)
    if state not in _VERIFIED:
        if _loadable(target) is not None:
            return False
        _VERIFIED.add(state)
    return True


def materialise_preset(name: str) -> Path:
    """The cache folder of a preset, built on first use (under a lock; atomically renamed into place).
    It is marked complete only once it loads; a folder marked complete that does not load (an older
    version's build on a non-zero rank wrote no weights) is rebuilt."""
    target = cache_dir() / "models" / name
    if _complete(target):
        return target
    with _locked(cache_dir() / "models" / f"{name}.lock"):
        if (target / _COMPLETE_MARK).exists():
            problem = _loadable(target)
            if problem is None:
                return target
            logger.warning("model cache %s is marked complete but does not load (%s); rebuilding it", target, problem)
        staging = target.with_name(f"{name}.building-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        logger.info("preparing model %s in %s (once per machine)", name, target)
        PRESETS[name](staging)
        problem = _loadable(staging)
        if problem is not None:
            raise ModelError(f"building model preset {name} in {staging} gave a folder that does not load: {problem}")
        (staging / _COMPLETE_MARK).write_text("ok\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        _VERIFIED.add(_state(target))
    return target


def resolve_model_path(name_or_path: str, field: str = "model.path") -> Path:
    """A local HF folder for a preset name or a path; a ModelError saying what is wrong otherwise."""
    if name_or_path in PRESETS:
        return materialise_preset(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelError(
            f"{field}: '{name_or_path}' does not exist and is not a preset "
            f"(presets: {', '.join(PRESETS)})")
    if not (path / "config.json").is_file():
        raise ModelError(f"{field}: '{name_or_path}' is not an HF model folder (no config.json in it)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError) as e:
        raise ModelError(f"{field}: cannot read {path / 'config.json'}: {e}") from None
    family_of(config, where=f"{field} ({path / 'config.json'})")
    return path
