"""Sparse upcycling: a Mixtral-style mixture of experts made from a dense LLaMA model.

Every expert of a layer starts as a copy of that layer's MLP and the router as small random weights.
Mixtral renormalises its top-k routing weights to sum to 1, so while the experts are identical the
block's output is the dense MLP's whatever the router says (up to rounding): the upcycled model
generates what the dense one does, and training lets the experts and the router grow apart.
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from ds_realloc.utils.errors import ModelError

ROUTER_STD = 0.02  # the router's initial weights: N(0, ROUTER_STD^2), nearly uniform routing


def upcycled_config(dense, experts: int, top_k: int) -> MixtralConfig:
    """The Mixtral config with the dense LLaMA config's shapes, `experts` experts per layer and top-`top_k` routing."""
    if dense.model_type != "llama":
        raise ModelError(f"upcycling makes a Mixtral model from a LLaMA one, got model_type '{dense.model_type}'")
    if not 1 <= top_k <= experts:
        raise ModelError(f"upcycling: top_k must be within [1, experts = {experts}], got {top_k}")
    if getattr(dense, "attention_bias", False) or getattr(dense, "mlp_bias", False):
        raise ModelError("upcycling: Mixtral has no attention or MLP biases; this LLaMA model has them")
    shared = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
              "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    return MixtralConfig(**{key: getattr(dense, key) for key in shared}, num_local_experts=experts,
                         num_experts_per_tok=top_k, sliding_window=None, architectures=["MixtralForCausalLM"])


@torch.no_grad()
def upcycle(dense: LlamaForCausalLM, experts: int, top_k: int, seed: int) -> MixtralForCausalLM:
    """The Mixtral model upcycled from `dense` (fp32): every weight of `dense`, each MLP copied into
    every expert of its layer, routers drawn from N(0, ROUTER_STD^2) with `seed`."""
    config = upcycled_config(dense.config, experts, top_k)
    moe = MixtralForCausalLM(config).to(torch.float32)
    weights = {}
    generator = torch.Generator().manual_seed(seed)
    state = dense.state_dict()
    for name, tensor in state.items():
        layer_mlp = ".mlp." in name
        if not layer_mlp:
            weights[name] = tensor
            continue
        prefix = name.split(".mlp.")[0] + ".mlp."
        if name.endswith("gate_proj.weight"):
            up = state[prefix + "up_proj.weight"]
            weights[prefix + "experts.gate_up_proj"] = torch.cat([tensor, up]).expand(experts, -1, -1).clone()
            router = torch.randn((experts, config.hidden_size), generator=generator) * ROUTER_STD
            weights[prefix + "gate.weight"] = router.to(tensor.dtype)
        elif name.endswith("down_proj.weight"):
            weights[prefix + "experts.down_proj"] = tensor.expand(experts, -1, -1).clone()
    missing, unexpected = moe.load_state_dict(weights, strict=False)
    missing = [n for n in missing if not (config.tie_word_embeddings and n == "lm_head.weight")]
    if missing or unexpected:
        raise ModelError(f"upcycling left weights unset {missing[:3]} or unused {unexpected[:3]}")
    if config.tie_word_embeddings:
        moe.tie_weights()
    return moe
