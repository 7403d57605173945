"""A model as the layouts see it: HF parameter names, shapes, shard rules and pipeline units,
derived from an HF config (an object or a dict of its fields) without building the model.

Pipeline units: 0 = embeddings, 1..L = transformer layers, L+1 = final norm and LM head.
Named sizes (`llama-7b` ... `llama-70b`) give the configs of well-known models for plan statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from ds_realloc.layout.sharding import FusedSplit, KVHeads, Replicated, ShardRule, Split
from ds_realloc.utils.errors import ConfigError


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    rule: ShardRule
    unit: int  # pipeline unit
    experts: bool = False  # dim 0 indexes the experts of an MoE layer (split over expert-parallel ranks)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelSpec:
    family: str
    params: tuple[ParamInfo, ...]
    num_layers: int
    tied_head: tuple[str, str] | None  # (head buffer name, embedding param it reads) when embeddings are tied

    @property
    def num_units(self) -> int:
        return self.num_layers + 2

    def param(self, name: str) -> ParamInfo:
        return self._by_name[name]

    @property
    def _by_name(self) -> dict[str, ParamInfo]:
        cached = self.__dict__.get("_by_name_cache")
        if cached is None:
            cached = {p.name: p for p in self.params}
            object.__setattr__(self, "_by_name_cache", cached)
        return cached

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    def unit_numel(self) -> list[int]:
        """Elements per pipeline unit (the tied head counts on the last unit too, as it is computed there)."""
        sizes = [0] * self.num_units
        for p in self.params:
            sizes[p.unit] += p.numel
        if self.tied_head:
            sizes[-1] += self.param(self.tied_head[1]).numel
        return sizes


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
        if value is not None:
            return value
    if default is not None:
        return default
    raise ConfigError(f"the model config has none of the fields {', '.join(names)}")


def config_field(config: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` an HF config (object or dict) sets, else `default` (an error naming them when None)."""
    return _get(config, *names, default=default)


QK_NORM_FAMILIES = ("qwen3_moe",)  # attention that RMS-normalises each head's q and k before RoPE


def _llama_params(config: Any) -> tuple[list[ParamInfo], int, bool]:
    hidden = _get(config, "hidden_size")
    layers = _get(config, "num_hidden_layers")
    heads = _get(config, "num_attention_heads")
    kv = _get(config, "num_key_value_heads", default=heads)
    head_dim = _get(config, "head_dim", default=hidden // heads)
    inter = _get(config, "intermediate_size")
    vocab = _get(config, "vocab_size")
    bias = _get(config, "model_type") == "qwen2" or bool(_get(config, "attention_bias", default=False))
    qk_norm = _get(config, "model_type") in QK_NORM_FAMILIES
    tied = bool(_get(config, "tie_word_embeddings", default=False))
    q_rule, kv_rule = Split(0, head_dim), KVHeads(kv, head_dim)
    params = [ParamInfo("model.embed_tokens.weight", (vocab, hidden), Split(0, uneven=True), 0)]
    for i in range(layers):
        prefix, unit = f"model.layers.{i}.", i + 1
        attention = [("q_proj", heads, q_rule), ("k_proj", kv, kv_rule), ("v_proj", kv, kv_rule)]
        for proj, n, rule in attention:
            params.append(ParamInfo(f"{prefix}self_attn.{proj}.weight", (n * head_dim, hidden), rule, unit))
            if bias:
                params.append(ParamInfo(f"{prefix}self_attn.{proj}.bias", (n * head_dim,), rule, unit))
        if qk_norm:  # RMSNorm weights over head_dim, shared by every head
            params += [ParamInfo(f"{prefix}self_attn.{norm}.weight", (head_dim,), Replicated(), unit)
                       for norm in ("q_norm", "k_norm")]
        params += [
            ParamInfo(f"{prefix}self_attn.o_proj.weight", (hidden, heads * head_dim), Split(1, head_dim), unit),
            ParamInfo(f"{prefix}mlp.gate_proj.weight", (inter, hidden), Split(0), unit),
            ParamInfo(f"{prefix}mlp.up_proj.weight", (inter, hidden), Split(0), unit),
            ParamInfo(f"{prefix}mlp.down_proj.weight", (hidden, inter), Split(1), unit),
            ParamInfo(f"{prefix}input_layernorm.weight", (hidden,), Replicated(), unit),
            ParamInfo(f"{prefix}post_attention_layernorm.weight", (hidden,), Replicated(), unit),
        ]
    params.append(ParamInfo("model.norm.weight", (hidden,), Replicated(), layers + 1))
    if not tied:
        params.append(ParamInfo("lm_head.weight", (vocab, hidden), Split(0, uneven=True), layers + 1))
    return params, layers, tied


def _moe_params(config: Any) -> tuple[list[ParamInfo], int, bool]:
    """Mixtral and Qwen3-MoE: LLaMA attention (Qwen3's with q/k norms) and sparse MoE blocks, written
    against the names and shapes transformers (5.x) holds in memory (the live ZeRO-3 partitions): per
    sparse layer the replicated router `mlp.gate.weight` [E, H], and every expert's weights fused in
    `mlp.experts.gate_up_proj` [E, 2I, H] (gate then up along dim 1, each split tp ways) and
    `mlp.experts.down_proj` [E, H, I] (split by its input, dim 2); both split by expert (dim 0) over
    expert-parallel ranks. Qwen3-MoE's dense layers (`mlp_only_layers`, or not a multiple of
    `decoder_sparse_step`) keep LLaMA's MLP of `intermediate_size`; its experts are
    `moe_intermediate_size` wide."""
    params, layers, tied = _llama_params(config)
    field = "num_local_experts" if _get(config, "num_local_experts", default=0) else "num_experts"
    experts = _get(config, field)
    top_k, hidden = _get(config, "num_experts_per_tok"), _get(config, "hidden_size")
    inter = _get(config, "moe_intermediate_size", "intermediate_size")
    if not 1 <= top_k <= experts:
        raise ConfigError(f"num_experts_per_tok={top_k} must be within [1, {field}={experts}]")
    dense = set(_get(config, "mlp_only_layers", default=[]) or [])
    step = _get(config, "decoder_sparse_step", default=1)
    sparse = {i for i in range(layers) if i not in dense and (i + 1) % step == 0}
    moe = []
    for p in params:
        if p.name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")) \
                and p.unit - 1 in sparse:
            if p.name.endswith("mlp.gate_proj.weight"):
                prefix = p.name.removesuffix("gate_proj.weight")
                moe += [ParamInfo(f"{prefix}gate.weight", (experts, hidden), Replicated(), p.unit),
                        ParamInfo(f"{prefix}experts.gate_up_proj", (experts, 2 * inter, hidden), FusedSplit(1, 2),
                                  p.unit, experts=True),
                        ParamInfo(f"{prefix}experts.down_proj", (experts, hidden, inter), Split(2), p.unit,
                                  experts=True)]
            continue
        moe.append(p)
    return moe, layers, tied


def _gpt2_params(config: Any) -> tuple[list[ParamInfo], int, bool]:
    hidden = _get(config, "n_embd", "hidden_size")
    layers = _get(config, "n_layer", "num_hidden_layers")
    heads = _get(config, "n_head", "num_attention_heads")
    inner = _get(config, "n_inner", default=4 * hidden)
    vocab, positions = _get(config, "vocab_size"), _get(config, "n_positions", "max_position_embeddings")
    head_dim = hidden // heads
    params = [ParamInfo("transformer.wte.weight", (vocab, hidden), Split(0, uneven=True), 0),
              ParamInfo("transformer.wpe.weight", (positions, hidden), Replicated(), 0)]
    for i in range(layers):
        p, unit = f"transformer.h.{i}.", i + 1
        params += [
            ParamInfo(f"{p}ln_1.weight", (hidden,), Replicated(), unit),
            ParamInfo(f"{p}ln_1.bias", (hidden,), Replicated(), unit),
            ParamInfo(f"{p}attn.c_attn.weight", (hidden, 3 * hidden), FusedSplit(1, 3, head_dim), unit),
            ParamInfo(f"{p}attn.c_attn.bias", (3 * hidden,), FusedSplit(0, 3, head_dim), unit),
            ParamInfo(f"{p}attn.c_proj.weight", (hidden, hidden), Split(0, head_dim), unit),  # Conv1D: [in, out]
            ParamInfo(f"{p}attn.c_proj.bias", (hidden,), Replicated(), unit),
            ParamInfo(f"{p}ln_2.weight", (hidden,), Replicated(), unit),
            ParamInfo(f"{p}ln_2.bias", (hidden,), Replicated(), unit),
            ParamInfo(f"{p}mlp.c_fc.weight", (hidden, inner), Split(1), unit),
            ParamInfo(f"{p}mlp.c_fc.bias", (inner,), Split(0), unit),
            ParamInfo(f"{p}mlp.c_proj.weight", (inner, hidden), Split(0), unit),
            ParamInfo(f"{p}mlp.c_proj.bias", (hidden,), Replicated(), unit),
        ]
    params += [ParamInfo("transformer.ln_f.weight", (hidden,), Replicated(), layers + 1),
               ParamInfo("transformer.ln_f.bias", (hidden,), Replicated(), layers + 1)]
    return params, layers, True  # GPT-2's LM head is always the token embedding


def _opt_params(config: Any) -> tuple[list[ParamInfo], int, bool]:
    """OPT (DeepSpeed-Chat's family): learned positions, biases everywhere, pre- or post-norm layers
    (`do_layer_norm_before`), and, when `word_embed_proj_dim` differs from the hidden size (OPT-350m),
    replicated projections between the embedding width and the hidden width."""
    hidden = _get(config, "hidden_size")
    layers = _get(config, "num_hidden_layers")
    heads = _get(config, "num_attention_heads")
    ffn = _get(config, "ffn_dim")
    vocab, positions = _get(config, "vocab_size"), _get(config, "max_position_embeddings")
    embed = _get(config, "word_embed_proj_dim", default=hidden)
    bias = bool(_get(config, "enable_bias", default=True))
    affine = bool(_get(config, "layer_norm_elementwise_affine", default=True))
    final_norm = bool(_get(config, "do_layer_norm_before", default=True)) and not bool(
        _get(config, "_remove_final_layer_norm", default=False))
    tied = bool(_get(config, "tie_word_embeddings", default=True))
    head_dim = hidden // heads
    d = "model.decoder."

    def norm(name: str, unit: int) -> list[ParamInfo]:
        return [ParamInfo(f"{name}.{leaf}", (hidden,), Replicated(), unit) for leaf in ("weight", "bias")] if affine \
            else []

    params = [ParamInfo(f"{d}embed_tokens.weight", (vocab, embed), Split(0, uneven=True), 0),
              ParamInfo(f"{d}embed_positions.weight", (positions + 2, hidden), Replicated(), 0)]
    if embed != hidden:
        params.append(ParamInfo(f"{d}project_in.weight", (hidden, embed), Replicated(), 0))
    for i in range(layers):
        p, unit = f"{d}layers.{i}.", i + 1
        for proj in ("q_proj", "k_proj", "v_proj"):
            params.append(ParamInfo(f"{p}self_attn.{proj}.weight", (hidden, hidden), Split(0, head_dim), unit))
            if bias:
                params.append(ParamInfo(f"{p}self_attn.{proj}.bias", (hidden,), Split(0, head_dim), unit))
        params.append(ParamInfo(f"{p}self_attn.out_proj.weight", (hidden, hidden), Split(1, head_dim), unit))
        if bias:
            params.append(ParamInfo(f"{p}self_attn.out_proj.bias", (hidden,), Replicated(), unit))
        params += norm(f"{p}self_attn_layer_norm", unit)
        params.append(ParamInfo(f"{p}fc1.weight", (ffn, hidden), Split(0), unit))
        if bias:
            params.append(ParamInfo(f"{p}fc1.bias", (ffn,), Split(0), unit))
        params.append(ParamInfo(f"{p}fc2.weight", (hidden, ffn), Split(1), unit))
        if bias:
            params.append(ParamInfo(f"{p}fc2.bias", (hidden,), Replicated(), unit))
        params += norm(f"{p}final_layer_norm", unit)
    if final_norm:
        params += norm(f"{d}final_layer_norm", layers + 1)
    if embed != hidden:
        params.append(ParamInfo(f"{d}project_out.weight", (embed, hidden), Replicated(), layers + 1))
    if not tied:
        params.append(ParamInfo("lm_head.weight", (vocab, embed), Split(0, uneven=True), layers + 1))
    return params, layers, tied


_FAMILIES = {"llama": _llama_params, "mistral": _llama_params, "qwen2": _llama_params, "gpt2": _gpt2_params,
             "opt": _opt_params, "mixtral": _moe_params, "qwen3_moe": _moe_params}
_TIED_HEAD = {"llama": ("lm_head.weight", "model.embed_tokens.weight"),
              "gpt2": ("lm_head.weight", "transformer.wte.weight"),
              "opt": ("lm_head.weight", "model.decoder.embed_tokens.weight")}


def model_spec(config: Any, value_head: bool = False) -> ModelSpec:
    """The parameters of an HF config's model (a language model, or with `value_head` the backbone
    plus a replicated `score.weight` [1, hidden] instead of the LM head, as *ForSequenceClassification)."""
    family = _get(config, "model_type")
    if family not in _FAMILIES:
        raise ConfigError(f"model_type '{family}' has no sharding rules; supported: {', '.join(sorted(_FAMILIES))}")
    params, layers, tied = _FAMILIES[family](config)
    if value_head:
        hidden = params[0].shape[1]
        params = [p for p in params if p.name != "lm_head.weight"]
        params.append(ParamInfo("score.weight", (1, hidden), Replicated(), layers + 1))
        tied = False
    tied_head = _TIED_HEAD.get(family, _TIED_HEAD["llama"]) if tied else None
    return ModelSpec(family, tuple(params), layers, tied_head)


# Configs of well-known sizes, for plan statistics without weights.
NAMED_CONFIGS: dict[str, dict] = {
    "llama-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "llama-34b": dict(model_type="llama", hidden_size=8192, intermediate_size=22016, num_hidden_layers=48,
                      num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
    "llama-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, num_local_experts=8,
                         num_experts_per_tok=2),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          vocab_size=151936, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
                          mlp_only_layers=[], norm_topk_prob=True, tie_word_embeddings=False),
}


def balanced_stages(sizes: list[int], stages: int) -> list[int]:
    """First unit of each of `stages` contiguous, non-empty stages minimising the largest stage
    (exact, by dynamic programming); the result is identical on every rank."""
    n = len(sizes)
    if not 1 <= stages <= n:
        raise ConfigError(f"cannot split {n} pipeline units (embeddings, {n - 2} layers, head) into {stages} stages")
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    INF = float("inf")
    best = [[INF] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    starts, i = [], n
    for k in range(stages, 0, -1):
        i = cut[k][i]
        starts.append(i)
    return starts[::-1]
