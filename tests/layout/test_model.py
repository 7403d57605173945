"""The sharding rules are written against the parameters transformers builds: for every named
config (dense, Mixtral, Qwen3-MoE with its q/k norms and dense layers), the spec's names and shapes
are exactly those of the HF model's live (meta) parameters."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ds_realloc.layout.model import NAMED_CONFIGS, model_spec


@pytest.mark.parametrize("name", sorted(NAMED_CONFIGS))
def test_named_config_specs_are_hf_parameters(name):
    fields = dict(NAMED_CONFIGS[name])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        hf = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    spec = model_spec(config)
    assert {p.name: p.shape for p in spec.params} == hf
    experts = [p.name for p in spec.params if p.experts]
    assert bool(experts) == ("num_experts" in fields or "num_local_experts" in fields)


def test_qwen3_moe_dense_layers_follow_mlp_only_layers_and_the_sparse_step():
    fields = dict(NAMED_CONFIGS["qwen3-30b-a3b"], num_hidden_layers=6, mlp_only_layers=[0], decoder_sparse_step=2)
    spec = model_spec(fields)
    sparse = sorted({int(p.name.split(".")[2]) for p in spec.params if p.experts})
    assert sparse == [1, 3, 5]  # layer 0 is listed dense; layers 2 and 4 are not multiples of the step
