"""Building a model from an HF folder, under ZeRO-3 without ever holding the full model on a rank.

With ZeRO-3 the model is constructed inside `deepspeed.zero.Init` (every parameter partitioned as
soon as it exists), then each rank reads only its own flat range `[i*P, (i+1)*P)` of every tensor
from the safetensors files into `param.ds_tensor`. Without ZeRO-3 the full tensors are copied in.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import deepspeed
import torch
import torch.distributed as dist
from torch import nn
import transformers
from transformers import AutoConfig
from transformers.initialization import no_init_weights
from transformers.integrations.deepspeed import prevent_arange_dtype_change

from ds_realloc.models.hf_io import CheckpointReader
from ds_realloc.models.registry import Head, family_of
from ds_realloc.models.value_head import ScalarHeadModel
from ds_realloc.utils.dist import DataParallelMPU
from ds_realloc.utils.errors import ModelError

_NEW_HEAD_PREFIX = "score."  # the only parameters allowed to be missing: a new scalar head
VALUE_HEAD_SEED = 4242


def model_config(model_dir: Path, head: Head, pad_token_id: int | None):
    """The HF config for a language model, or for a scalar-head model on the same backbone."""
    config = AutoConfig.from_pretrained(model_dir)
    family = family_of(config, where=str(model_dir / "config.json"))
    # No dropout: log-probs must be identical between generation, inference and training calls.
    for key, value in config.to_dict().items():
        if key.endswith(("dropout", "pdrop")) and isinstance(value, float):
            setattr(config, key, 0.0)
    if head == "value":
        config.num_labels = 1
        config.architectures = [family.sequence_classifier]
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
    return config


def _new_head_values(shape: torch.Size, seed: int) -> torch.Tensor:
    """A new scalar head, the same on every rank: N(0, 1/(hidden+1)) as in OpenRLHF's value heads."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32) / (shape[-1] + 1)


def _fill_partition(tensor: torch.Tensor, start: int, numel: int, read: Callable[[int, int], torch.Tensor]) -> None:
    """Write elements [start, start + len(tensor)) of a flat parameter into a partition; zero the padding."""
    end = min(start + tensor.numel(), numel)
    valid = max(end - start, 0)
    with torch.no_grad():
        if valid:
            tensor.view(-1)[:valid].copy_(read(start, end))
        tensor.view(-1)[valid:].zero_()


def _load_param(param: nn.Parameter, read: Callable[[int, int], torch.Tensor]) -> None:
    if not hasattr(param, "ds_id"):
        with torch.no_grad():
            param.data.view(-1).copy_(read(0, param.numel()))
        return
    # ZeRO-3: rank i of the partition group holds flat [i*P, (i+1)*P) with P = ceil(N / D).
    group_rank = dist.get_rank(group=param.ds_process_group)
    size = param.ds_tensor.numel()
    _fill_partition(param.ds_tensor.data, group_rank * size, param.ds_numel, read)
    secondary = getattr(param, "ds_secondary_tensor", None)
    if secondary is not None:  # ZeRO++ hpZ keeps a second, intra-node partition of the same layout
        secondary_rank = dist.get_rank(group=param.ds_zero_param_process_group)
        _fill_partition(secondary.data, secondary_rank * secondary.numel(), param.ds_numel, read)


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Copy every parameter (and persistent buffer) of `model` from the checkpoint in `model_dir`."""
    reader = CheckpointReader(model_dir)
    prefix = model.base_model_prefix
    for name, param in model.named_parameters():
        shape = tuple(param.ds_shape) if hasattr(param, "ds_id") else tuple(param.shape)
        key = reader.resolve(name, prefix)
        if key is None:
            if not name.startswith(_NEW_HEAD_PREFIX):
                raise ModelError(f"{model_dir}: the checkpoint has no tensor for parameter '{name}'")
            values = _new_head_values(torch.Size(shape), VALUE_HEAD_SEED).view(-1)
            _load_param(param, lambda start, end: values[start:end])
            continue
        stored = reader.shape(key)
        if stored != shape:
            raise ModelError(f"{reader.where(key)}: tensor '{key}' has shape {list(stored)}, "
                             f"the model expects {list(shape)}")
        _load_param(param, lambda start, end, key=key: reader.read_flat(key, start, end))
    persistent = set(model.state_dict().keys())
    for name, buffer in model.named_buffers():
        key = reader.resolve(name, prefix)
        if name in persistent and key is not None:
            with torch.no_grad():
                buffer.copy_(reader.read(key))


def instantiate(model_dir: Path, head: Head, dtype: torch.dtype, zero3_config: dict | None,
                pad_token_id: int | None = None, mpu: DataParallelMPU | None = None) -> nn.Module:
    """An HF model (or ScalarHeadModel for head="value") with the weights of `model_dir`.

    `zero3_config` (a DeepSpeed config with stage 3) partitions parameters over the data-parallel
    group of `mpu` (default: the world) while they are created, so no rank holds the full model."""
    config = model_config(model_dir, head, pad_token_id)
    # Resolve (import) the class before zero.Init: importing HF modeling code inside it breaks, as
    # DeepSpeed patches tensor construction there.
    family = family_of(config)
    model_class = getattr(transformers, family.sequence_classifier if head == "value" else family.causal_lm)
    with contextlib.ExitStack() as stack:
        # Weights are all read from the checkpoint, so HF's random init is skipped (and under ZeRO-3
        # it would touch empty partitions); RoPE buffers keep their fp32 dtype inside zero.Init.
        stack.enter_context(no_init_weights())
        if zero3_config is not None:
            stack.enter_context(prevent_arange_dtype_change())
            # dtype=None: zero.Init then takes the precision from the config. DeepSpeed 0.19's
            # `dtype or fp16 if fp16_supported else bf16` turns an explicit fp32 into bf16 on CPU.
            stack.enter_context(deepspeed.zero.Init(
                config_dict_or_path=zero3_config, dtype=None, mpu=mpu,
                data_parallel_group=mpu.get_data_parallel_group() if mpu else None))
        model = model_class._from_config(config, dtype=dtype)
    model.tie_weights()
    stored = {p.ds_tensor.dtype if hasattr(p, "ds_id") else p.dtype for p in model.parameters()}
    if stored != {dtype}:
        raise RuntimeError(f"parameters were created as {stored}, expected {dtype}")
    load_weights(model, model_dir)
    model.config.use_cache = False
    return ScalarHeadModel(model) if head == "value" else model
