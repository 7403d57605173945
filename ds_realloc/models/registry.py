"""The HF architectures ds_realloc trains and serves, keyed by `config.model_type`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transformers import PretrainedConfig

from ds_realloc.utils.errors import ModelError

Head = Literal["lm", "value"]  # a language-model head, or a scalar (critic / reward) head


@dataclass(frozen=True)
class Family:
    """What the rest of the code needs to know about an architecture family."""

    name: str
    causal_lm: str  # HF class name of the language model
    sequence_classifier: str  # HF class name of the same backbone with a scalar `score` head


FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", "LlamaForSequenceClassification"),
    "mistral": Family("mistral", "MistralForCausalLM", "MistralForSequenceClassification"),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "gpt2": Family("gpt2", "GPT2LMHeadModel", "GPT2ForSequenceClassification"),
    "opt": Family("opt", "OPTForCausalLM", "OPTForSequenceClassification"),
    "mixtral": Family("mixtral", "MixtralForCausalLM", "MixtralForSequenceClassification"),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeForSequenceClassification"),
}


def family_of(config: PretrainedConfig, where: str = "model") -> Family:
    """The family of an HF config, or a ModelError that lists the supported ones."""
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise ModelError(
            f"{where}: model_type '{getattr(config, 'model_type', None)}' is not supported; "
            f"supported: {', '.join(sorted(FAMILIES))}")
    return family
