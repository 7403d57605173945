"""Each cost-model term against a value computed by hand for a small LLaMA."""

import pytest

from ds_realloc.layout.model import NAMED_CONFIGS
from ds_realloc.planner import cost
from ds_realloc.planner.cost import ModelShape
from ds_realloc.planner.profile import DeviceProfile, Link

SMALL = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
# per layer: q 64x64 + k, v 32x64 + o 64x64 = 12288; gate, up, down 3 x 128x64 = 24576; two norms 128
LAYER = 12288 + 24576 + 128
PARAMS = 100 * 64 + 2 * LAYER + 64 + 100 * 64
LINK = Link(1e10, 1e-5)
PROFILE = DeviceProfile("fake", 10**9, {"bf16": 1e12, "fp32": 2.5e11}, 1e11, LINK, Link(1e9, 1e-4), 1e9, 1e8, 4)


def test_the_shape_counts_the_layouts_parameters():
    shape = ModelShape.of(SMALL)
    assert (shape.params, shape.layer_params, shape.active_matmul_params) == (PARAMS, 2 * LAYER, 2 * (12288 + 24576))
    assert (shape.kv_dim, shape.head_matmul_params) == (32, 6400)
    assert ModelShape.of(NAMED_CONFIGS["llama-7b"]).params == 6_738_415_616  # LLaMA-7B's published count
    assert ModelShape.of(NAMED_CONFIGS["llama-70b"]).params == 68_976_648_192  # Llama-2-70B's


def test_an_moe_token_multiplies_by_its_top_k_experts_only():
    moe = ModelShape.of(NAMED_CONFIGS["mixtral-8x7b"])
    expert = 3 * 14336 * 4096  # w1, w2, w3 of one expert
    attention = 2 * 4096 * 4096 + 2 * 1024 * 4096
    assert moe.active_matmul_params == 32 * (attention + 4096 * 8 + 2 * expert)  # router + 2 of 8 experts
    assert moe.params == 46_702_792_704  # Mixtral-8x7B's published count


def test_flops_and_collectives():
    shape = ModelShape.of(SMALL)
    assert cost.forward_flops(shape, 10, 5, 10) == 2 * 10 * 73728 + 4 * 10 * 5 * 4 * 16 * 2 + 2 * 10 * 6400
    assert cost.all_reduce_s(1e6, 4, Link(1e9, 1e-5)) == pytest.approx(1.5e-3 + 6e-5)
    assert cost.all_gather_s(1e6, 4, Link(1e9, 1e-5)) == pytest.approx(0.75e-3 + 3e-5)
    assert cost.all_reduce_s(1e6, 1, LINK) == cost.all_gather_s(1e6, 1, LINK) == 0
    assert cost.transfer_s(2e10, LINK, messages=3) == pytest.approx(2 + 3e-5) and cost.transfer_s(0, LINK) == 0
    assert cost.causal_context(7) == 4


def test_decode_is_memory_bound_and_prefill_compute_bound():
    shape = ModelShape.of(SMALL)
    weights = (2 * LAYER + 6400) * 2
    kv = 2 * 2 * 2 * 8 * 32 * 2  # K and V, 2 layers, 2 rows, 8 positions, kv_dim 32, bf16
    assert cost.decode_step_s(shape, 2, 8, 1, PROFILE, "bf16") == pytest.approx((weights + kv) / 1e11)
    # at tp 2: half the bytes, and 2 all-reduces per layer of [2, 64] bf16 plus the head's two of [2] fp32
    tp2 = (weights + kv) / 2 / 1e11 + 4 * (256 / 1e10 + 2e-5) + 2 * (8 / 1e10 + 2e-5)  # 2(n-1)/n = 1 at n = 2
    assert cost.decode_step_s(shape, 2, 8, 2, PROFILE, "bf16") == pytest.approx(tp2)
    flops = cost.forward_flops(shape, 4 * 512, 256.5, 4)
    assert cost.prefill_s(shape, 4, 512, 1, PROFILE, "bf16") == pytest.approx(flops / 1e12)
    steps = sum(cost.decode_step_s(shape, 4, 512 + t, 1, PROFILE, "bf16") for t in range(15))
    assert cost.generate_s(shape, 4, 512, 16, 1, PROFILE, "bf16") == pytest.approx(flops / 1e12 + steps)


def test_training_terms():
    shape = ModelShape.of(SMALL)
    forward = cost.forward_flops(shape, 8 * 32, 16.5, 8 * 32)
    assert cost.train_compute_s(shape, 8, 32, PROFILE, "bf16") == pytest.approx(3 * forward / 1e12)
    assert cost.train_compute_s(shape, 8, 32, PROFILE, "bf16", checkpointing=True) == pytest.approx(4 * forward / 1e12)
    gather = 0.5 * PARAMS * 2 / 1e10 + 1e-5
    assert cost.zero_traffic_s(shape, 3, 2, 2, LINK, "bf16") == pytest.approx(6 * gather)
    assert cost.zero_traffic_s(shape, 2, 2, 2, LINK, "bf16") == pytest.approx(3 * gather)
    assert cost.zero_traffic_s(shape, 1, 2, 2, LINK, "bf16") == pytest.approx(2 * gather)
    assert cost.zero_traffic_s(shape, 0, 2, 2, LINK, "bf16") == pytest.approx(2 * gather)
    assert cost.optimizer_s(shape, 3, 2, False, PROFILE, "bf16") == pytest.approx(PARAMS / 2 * 30 / 1e11)
    assert cost.optimizer_s(shape, 0, 2, False, PROFILE, "bf16") == pytest.approx(PARAMS * 30 / 1e11)
    offloaded = PARAMS / 2 / 1e8 + 2 * PARAMS / 2 * 2 / 1e9
    assert cost.optimizer_s(shape, 2, 2, True, PROFILE, "bf16") == pytest.approx(offloaded)


def test_memory_terms():
    shape = ModelShape.of(SMALL)
    assert cost.train_state_bytes(shape, 0, 2, False, False, "bf16") == 16 * PARAMS
    assert cost.train_state_bytes(shape, 1, 2, False, False, "bf16") == 4 * PARAMS + 6 * PARAMS
    assert cost.train_state_bytes(shape, 2, 2, False, False, "bf16") == 2 * PARAMS + PARAMS + 6 * PARAMS
    assert cost.train_state_bytes(shape, 3, 2, False, False, "bf16") == PARAMS + PARAMS + 6 * PARAMS
    assert cost.train_state_bytes(shape, 3, 2, True, True, "bf16") == PARAMS
    per_token = (5 * 64 + 64 + 64 + 3 * 128) * 2 + (2 + 4) * 4
    assert cost.activation_bytes(shape, 10, "bf16") == 2 * 10 * per_token
    peak = cost.train_state_bytes(shape, 3, 2, False, False, "bf16") + 2 * 64 * per_token + 64 * 100 * 8 + LAYER * 2
    assert cost.train_peak_bytes(shape, 3, 2, 2, 32, False, False, "bf16") == peak + PARAMS * 2  # + the bucket
    assert cost.gradient_bucket_bytes(shape, 1, "bf16") == 0 and cost.gradient_bucket_bytes(shape, 2, "fp32") == \
        PARAMS * 4
    kv = 2 * 2 * 4 * 40 * 32 * 2
    assert cost.kv_cache_bytes(shape, 4, 40, "bf16") == kv
    assert cost.inference_peak_bytes(shape, 4, 40, 2, "bf16", 4) == (PARAMS * 2 + kv) // 2 + 4 * 50 * 4
