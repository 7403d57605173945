"""The cost model: one pure function per term of a step's time and of a rank's memory.

Every term reads a `ModelShape` (counted from the layouts' own `ModelSpec`, so the planner and the
reallocation plans see the same parameters) and a `DeviceProfile`. Times are seconds on one rank;
a term that has a compute and a memory side is bound by the larger (a roofline). Collectives are
rings: an all-reduce moves 2(n-1)/n of the buffer per rank in 2(n-1) steps, an all-gather or a
reduce-scatter (n-1)/n in n-1. Conventions: `rows` are sequences, `tokens` are rows x length, `tp`
splits weights and heads, data parallelism is the caller's (pass one replica's rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ds_realloc.layout.model import ModelSpec, config_field, model_spec
from ds_realloc.planner.profile import DeviceProfile, Link

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_STATE_BYTES = 12  # fp32 master weights, momentum and variance per parameter (DeepSpeed's mixed precision)
ADAM_TRAFFIC_BYTES = 30  # an Adam step reads p, m, v, g (fp32) and writes p, m, v (fp32) and the low-precision copy
LOGIT_BYTES = 4  # logits are fp32 wherever they are materialised


@dataclass(frozen=True)
class ModelShape:
    """What the cost terms need to know about a model, per transformer layer where it repeats."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    params: int  # every parameter (the tied head counted once)
    layer_params: int  # every parameter of the transformer layers (all experts)
    active_matmul_params: int  # weights one token multiplies by in the layers (its top-k experts only)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def head_matmul_params(self) -> int:
        return self.vocab * self.hidden

    @staticmethod
    def of(config: Any, value_head: bool = False) -> "ModelShape":
        spec = model_spec(config, value_head)
        heads = config_field(config, "num_attention_heads")
        hidden = config_field(config, "hidden_size")
        experts = config_field(config, "num_local_experts", "num_experts", default=1)
        top_k = config_field(config, "num_experts_per_tok", default=1) if experts > 1 else 1
        return ModelShape(
            layers=spec.num_layers, hidden=hidden, heads=heads,
            kv_heads=config_field(config, "num_key_value_heads", default=heads),
            head_dim=config_field(config, "head_dim", default=hidden // heads), vocab=config_field(config, "vocab_size"),
            intermediate=config_field(config, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden),
            params=spec.numel, layer_params=_layer_params(spec),
            active_matmul_params=_active_matmul_params(spec, top_k / experts))


def _layer_params(spec: ModelSpec) -> int:
    return sum(p.numel for p in spec.params if 1 <= p.unit <= spec.num_layers)


def _active_matmul_params(spec: ModelSpec, expert_fraction: float) -> int:
    """Weights of the layers' matmuls a token passes through: an MoE layer's experts count top_k / E."""
    total = 0.0
    for p in spec.params:
        if 1 <= p.unit <= spec.num_layers and len(p.shape) >= 2:
            total += p.numel * (expert_fraction if p.experts else 1.0)
    return round(total)


# ----------------------------------------------------------------------------------------- primitives


def matmul_s(flops: float, profile: DeviceProfile, dtype: str) -> float:
    return flops / profile.flops(dtype)


def memory_s(nbytes: float, profile: DeviceProfile) -> float:
    return nbytes / profile.memory_bandwidth


def all_reduce_s(nbytes: float, ranks: int, link: Link) -> float:
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / link.bandwidth + 2 * (ranks - 1) * link.latency


def all_gather_s(nbytes: float, ranks: int, link: Link) -> float:
    """Gathering (or reduce-scattering) a buffer of `nbytes` in total over `ranks` ranks."""
    if ranks <= 1:
        return 0.0
    return (ranks - 1) / ranks * nbytes / link.bandwidth + (ranks - 1) * link.latency


def transfer_s(nbytes: float, link: Link, messages: int = 1) -> float:
    """Receiving `nbytes` in `messages` point-to-point messages (a reallocation's or a batch move's)."""
    return nbytes / link.bandwidth + messages * link.latency if nbytes else 0.0


# ---------------------------------------------------------------------------------------------- FLOPs


def forward_flops(shape: ModelShape, tokens: int, context: float, logit_tokens: int) -> float:
    """FLOPs of a forward over `tokens` tokens attending to `context` keys on average, with the LM head
    applied to `logit_tokens` of them: 2 per weight and token, 4 * context * heads * head_dim per layer
    and token for the scores and the weighted sum."""
    layers = 2 * tokens * shape.active_matmul_params
    attention = 4 * tokens * context * shape.heads * shape.head_dim * shape.layers
    return layers + attention + 2 * logit_tokens * shape.head_matmul_params


def causal_context(length: int) -> float:
    """Mean number of keys a token of a causal sequence of `length` attends to."""
    return (length + 1) / 2


# -------------------------------------------------------------------------------------- generation


def _tp_all_reduces_s(shape: ModelShape, tokens: int, tp: int, link: Link, dtype: str) -> float:
    """Two all-reduces of the hidden states per layer (attention and MLP outputs), plus the head's two small ones."""
    return 2 * shape.layers * all_reduce_s(tokens * shape.hidden * BYTES[dtype], tp, link) + \
        2 * all_reduce_s(tokens * LOGIT_BYTES, tp, link)


def prefill_s(shape: ModelShape, rows: int, prompt_len: int, tp: int, profile: DeviceProfile, dtype: str,
              link: Link | None = None) -> float:
    """The prompt's forward (compute bound), logits of each row's last token only."""
    tokens = rows * prompt_len
    compute = matmul_s(forward_flops(shape, tokens, causal_context(prompt_len), rows) / tp, profile, dtype)
    weights = memory_s(matmul_weight_bytes(shape, dtype) / tp, profile)
    return max(compute, weights) + _tp_all_reduces_s(shape, tokens, tp, link or profile.intra_node, dtype)


def decode_step_s(shape: ModelShape, rows: int, context: int, tp: int, profile: DeviceProfile, dtype: str,
                  link: Link | None = None) -> float:
    """One token for each of `rows` rows (memory bound): every weight and the KV cache read once."""
    compute = matmul_s(forward_flops(shape, rows, context, rows) / tp, profile, dtype)
    read = memory_s((matmul_weight_bytes(shape, dtype) + kv_cache_bytes(shape, rows, context, dtype)) / tp, profile)
    return max(compute, read) + _tp_all_reduces_s(shape, rows, tp, link or profile.intra_node, dtype)


def generate_s(shape: ModelShape, rows: int, prompt_len: int, new_tokens: int, tp: int, profile: DeviceProfile,
               dtype: str, link: Link | None = None) -> float:
    """Prefill, then one decode step per new token; the longest response decides, so all rows run
    `new_tokens` steps (a finished row still occupies its slot)."""
    steps = sum(decode_step_s(shape, rows, prompt_len + t, tp, profile, dtype, link) for t in range(new_tokens - 1))
    return prefill_s(shape, rows, prompt_len, tp, profile, dtype, link) + steps


def score_s(shape: ModelShape, rows: int, length: int, tp: int, profile: DeviceProfile, dtype: str,
            logits: bool = True, link: Link | None = None) -> float:
    """An inference forward over whole sequences (reference / reward / critic), logits for every token or none."""
    tokens = rows * length
    flops = forward_flops(shape, tokens, causal_context(length), tokens if logits else 0)
    compute = matmul_s(flops / tp, profile, dtype)
    return max(compute, memory_s(matmul_weight_bytes(shape, dtype) / tp, profile)) + \
        _tp_all_reduces_s(shape, tokens, tp, link or profile.intra_node, dtype)


# ---------------------------------------------------------------------------------------- training


def train_compute_s(shape: ModelShape, rows: int, length: int, profile: DeviceProfile, dtype: str,
                    logits: bool = True, checkpointing: bool = False) -> float:
    """Forward and backward (twice the forward) of one rank's rows; a checkpointed model runs the forward twice."""
    tokens = rows * length
    forward = forward_flops(shape, tokens, causal_context(length), tokens if logits else 0)
    return matmul_s((4 if checkpointing else 3) * forward, profile, dtype)


def zero_traffic_s(shape: ModelShape, stage: int, dp: int, micro_batches: int, link: Link, dtype: str) -> float:
    """ZeRO's collectives for one optimizer step of `micro_batches` micro-batches per rank: stage 0 all-reduces
    the gradients once; 1 reduce-scatters them and all-gathers the updated weights once; 2 reduce-scatters at
    every micro-batch; 3 also gathers the weights for every micro-batch's forward and backward."""
    nbytes = shape.params * BYTES[dtype]
    if stage == 0:
        return all_reduce_s(nbytes, dp, link)
    if stage == 1:
        return 2 * all_gather_s(nbytes, dp, link)
    if stage == 2:
        return (micro_batches + 1) * all_gather_s(nbytes, dp, link)
    return 3 * micro_batches * all_gather_s(nbytes, dp, link)


def optimizer_s(shape: ModelShape, stage: int, dp: int, offload: bool, profile: DeviceProfile, dtype: str) -> float:
    """Adam over this rank's share of the parameters (all of them at stage 0): on the device, bound by its
    memory traffic; offloaded, by the host's Adam and the gradients down / weights up over PCIe."""
    owned = shape.params / (dp if stage >= 1 else 1)
    if offload:
        return owned / profile.host_adam_params_per_s + 2 * owned * BYTES[dtype] / profile.host_bandwidth
    return memory_s(owned * ADAM_TRAFFIC_BYTES, profile)


# ------------------------------------------------------------------------------------------- memory


def weight_bytes(shape: ModelShape, dtype: str) -> int:
    return shape.params * BYTES[dtype]


def matmul_weight_bytes(shape: ModelShape, dtype: str) -> int:
    """The weights a forward reads: every layer's (all experts) and the LM head's (not the embedding's rows)."""
    return (shape.layer_params + shape.head_matmul_params) * BYTES[dtype]


def kv_cache_bytes(shape: ModelShape, rows: int, context: int, dtype: str) -> int:
    """Keys and values of every layer for `rows` rows of `context` tokens (all heads: divide by tp)."""
    return 2 * shape.layers * rows * context * shape.kv_dim * BYTES[dtype]


def activation_bytes(shape: ModelShape, tokens: int, dtype: str) -> int:
    """What a LLaMA layer keeps for its backward per token, without checkpointing and with a fused
    attention that saves no scores: the two norms' inputs, q, k, v, the attention output (and its
    log-sum-exp), the output projection's input, the MLP's gate, up and their product, and the residual."""
    per_token = (5 * shape.hidden + shape.heads * shape.head_dim + 2 * shape.kv_dim + 3 * shape.intermediate)
    per_token_fp32 = 2 + shape.heads  # the norms' reciprocal RMS, the attention's log-sum-exp per head
    return shape.layers * tokens * (per_token * BYTES[dtype] + per_token_fp32 * 4)


def logits_bytes(tokens: int, vocab_per_rank: int, backward: bool) -> int:
    """fp32 logits [tokens, vocab / tp] (and their gradient when trained)."""
    return tokens * vocab_per_rank * LOGIT_BYTES * (2 if backward else 1)


def train_state_bytes(shape: ModelShape, stage: int, dp: int, offload_optimizer: bool, offload_param: bool,
                      dtype: str) -> int:
    """Weights, gradients and Adam states resident on one device under ZeRO `stage` over `dp` ranks:
    stage 1 partitions the optimizer states, 2 also the gradients, 3 also the weights; offload moves the
    optimizer states (and with offload_param the weights) to the host."""
    n, b = shape.params, BYTES[dtype]
    weights = 0 if offload_param else (n * b / dp if stage == 3 else n * b)
    gradients = n * b / dp if stage >= 2 else n * b
    optimizer = 0 if offload_optimizer else (n * ADAM_STATE_BYTES / dp if stage >= 1 else n * ADAM_STATE_BYTES)
    return round(weights + gradients + optimizer)


REDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size default (we set none)


def gradient_bucket_bytes(shape: ModelShape, stage: int, dtype: str) -> int:
    """ZeRO-2 / 3 collect gradients for their reduce-scatter in a bucket of up to reduce_bucket_size
    elements in the training dtype (ZeRO 0 / 1 reduce the gradients in place at the boundary)."""
    return min(REDUCE_BUCKET_ELEMENTS, shape.params) * BYTES[dtype] if stage >= 2 else 0


def train_peak_bytes(shape: ModelShape, stage: int, dp: int, micro_rows: int, length: int, offload_optimizer: bool,
                     offload_param: bool, dtype: str, logits: bool = True) -> int:
    """Peak memory of one training rank: its states, one micro-batch's activations and logits, under
    ZeRO-2 / 3 the gradient bucket and under ZeRO-3 the largest layer gathered whole."""
    tokens = micro_rows * length
    gathered = shape.layer_params / shape.layers * BYTES[dtype] if stage == 3 else 0
    vocab = shape.vocab if logits else 1
    return round(train_state_bytes(shape, stage, dp, offload_optimizer, offload_param, dtype)
                 + activation_bytes(shape, tokens, dtype) + logits_bytes(tokens, vocab, backward=True) + gathered
                 + gradient_bucket_bytes(shape, stage, dtype))


def inference_peak_bytes(shape: ModelShape, rows: int, context: int, tp: int, dtype: str, logit_tokens: int) -> int:
    """One inference rank: its weight shard, its heads' KV cache and fp32 logits of `logit_tokens` tokens
    over its vocabulary shard."""
    return round((weight_bytes(shape, dtype) + kv_cache_bytes(shape, rows, context, dtype)) / tp
                 + logits_bytes(logit_tokens, -(-shape.vocab // tp), backward=False))
