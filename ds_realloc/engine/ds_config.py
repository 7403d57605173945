"""The DeepSpeed config of a model: our defaults, then accelerate's DeepSpeed plugin (under
`accelerate launch`), then the user's JSON (`engine.deepspeed_config`), later sources winning.

Batch geometry always comes from our config (the data pipeline is built from it); a differing
batch value in an external config is replaced, with a warning naming its source.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.optim.lr_scheduler import LRScheduler
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from ds_realloc.engine.config import EngineConfig, OptimConfig
from ds_realloc.utils.errors import ConfigError
from ds_realloc.utils.logging import get_logger

logger = get_logger(__name__)

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_NEVER_PRINT = 2**31 - 1  # DeepSpeed's own step printing; our runner logs every step


@dataclass(frozen=True)
class BatchGeometry:
    """Sequences per rank per forward, forwards per optimizer step, and data-parallel ranks."""

    micro_batch_size: int
    grad_accum: int
    dp_size: int

    @property
    def train_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp_size


def auto_dtype() -> str:
    """bf16 where the hardware computes it natively (a GPU that supports it, or a CPU whose oneDNN has
    bf16 kernels: AVX512-BF16 / AMX, where bf16 matmuls run 2-4x faster than fp32), else fp32."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def torch_dtype(ds_config: dict) -> torch.dtype:
    """The model dtype a final DeepSpeed config trains in."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def _merge(ours: dict, theirs: dict) -> dict:
    """`theirs` over `ours`, recursively; "auto" in theirs keeps our value."""
    merged = copy.deepcopy(ours)
    for key, value in theirs.items():
        if value == "auto":
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _accelerate_config() -> dict | None:
    """The DeepSpeed config of accelerate's plugin when running under `accelerate launch` with DeepSpeed."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    from accelerate.utils import DeepSpeedPlugin

    config = copy.deepcopy(DeepSpeedPlugin().deepspeed_config)
    config.pop("steps_per_print", None)
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision in ("bf16", "fp16"):
        config[precision] = {"enabled": True}
    elif precision == "no":
        config.setdefault("bf16", {"enabled": False})
        config.setdefault("fp16", {"enabled": False})
    return config


def _user_config(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"engine.deepspeed_config: cannot read {path}: {e.strerror}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON in engine.deepspeed_config: {e.msg}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object")
    return config


def _offload(device_on: bool) -> dict:
    return {"device": "cpu" if device_on else "none", "pin_memory": torch.cuda.is_available()}


def _optimizer_on_cpu(engine: EngineConfig) -> bool:
    """Whether the optimizer steps with DeepSpeedCPUAdam through ZeRO-Offload: when asked, and on a
    CPU-only machine with ZeRO >= 1, where the states are in CPU memory anyway and DeepSpeed's
    vectorised CPU Adam steps ~10x faster than torch's AdamW (the same update; nothing moves)."""
    return engine.offload_optimizer or (not torch.cuda.is_available() and engine.zero_stage >= 1)


def _base_config(engine: EngineConfig, batch: BatchGeometry) -> dict:
    dtype = auto_dtype() if engine.dtype == "auto" else engine.dtype
    return {
        "train_batch_size": batch.train_batch_size,
        "train_micro_batch_size_per_gpu": batch.micro_batch_size,
        "gradient_accumulation_steps": batch.grad_accum,
        "steps_per_print": _NEVER_PRINT,
        "wall_clock_breakdown": False,
        # tag validation all-reduces over the whole world; our tags are the same on every rank anyway
        "checkpoint": {"tag_validation": "Ignore"},
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "loss_scale_window": 100, "initial_scale_power": 16},
        "zero_optimization": {
            "stage": engine.zero_stage,
            "offload_optimizer": _offload(_optimizer_on_cpu(engine)),
            "offload_param": _offload(engine.offload_param),
            "stage3_param_persistence_threshold": 1e4,
            "stage3_max_live_parameters": 3e7,
            "stage3_prefetch_bucket_size": 3e7,
            "contiguous_gradients": True,
        },
    }


def _with_external(config: dict, engine: EngineConfig, batch: BatchGeometry) -> dict:
    sources = []
    accelerate = _accelerate_config()
    if accelerate is not None:
        sources.append(("accelerate's DeepSpeed plugin", accelerate))
    if engine.deepspeed_config:
        sources.append((engine.deepspeed_config, _user_config(engine.deepspeed_config)))
    ours = {key: config[key] for key in _BATCH_KEYS}
    for source, external in sources:
        config = _merge(config, external)
        for key, value in ours.items():
            if external.get(key, "auto") not in ("auto", value):
                logger.warning("%s sets %s=%s; using %s, from train.batch_size and train.micro_batch_size",
                               source, key, external[key], value)
            config[key] = value
    stage = zero_stage(config)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0-3, got {stage}")
    return config


def train_ds_config(engine: EngineConfig, optim: OptimConfig, batch: BatchGeometry, total_steps: int) -> dict:
    """The DeepSpeed config of a trained model (optimizer and LR schedule included)."""
    config = _base_config(engine, batch)
    config["gradient_clipping"] = optim.grad_clip
    adam = {"lr": optim.lr, "betas": [optim.beta1, optim.beta2], "eps": optim.eps, "weight_decay": optim.weight_decay}
    if not torch.cuda.is_available() and not _optimizer_on_cpu(engine):
        adam["torch_adam"] = True  # ZeRO-0 on CPU: no fused kernel to build; torch's AdamW is the same update
    config["optimizer"] = {"type": "AdamW", "params": adam}
    return _with_external(config, engine, batch)


def lr_schedule(optim: OptimConfig, total_steps: int) -> Callable[[torch.optim.Optimizer], LRScheduler]:
    """Linear warmup, then cosine decay to `min_lr_ratio` x lr (HF Trainer's schedule: with no warmup the
    first step runs at the full rate). DeepSpeed's WarmupCosineLR is not used: it sets lr=0 for step 1."""
    return functools.partial(get_cosine_with_min_lr_schedule_with_warmup, num_warmup_steps=optim.warmup_steps,
                             num_training_steps=max(total_steps, 1), min_lr_rate=optim.min_lr_ratio)


def frozen_ds_config(train_config: dict, offload: bool, batch: BatchGeometry | None = None) -> dict:
    """The DeepSpeed config of a frozen model (reference, reward) beside a trained one: ZeRO-3 when
    training uses it, else plain replicas; parameters kept on CPU between calls when `offload`.
    `batch` is the geometry of the frozen model's own mesh when it differs from the trained one's."""
    stage = zero_stage(train_config)
    zero = train_config["zero_optimization"]
    geometry = ({key: train_config[key] for key in _BATCH_KEYS} if batch is None else
                dict(zip(_BATCH_KEYS, (batch.train_batch_size, batch.micro_batch_size, batch.grad_accum))))
    return {
        **{key: train_config[key] for key in ("steps_per_print", "bf16", "fp16")}, **geometry,
        "zero_optimization": {
            "stage": 3 if stage == 3 else 0,
            "offload_param": _offload(offload and stage == 3),
            **{key: zero[key] for key in ("stage3_param_persistence_threshold", "stage3_max_live_parameters",
                                          "stage3_prefetch_bucket_size") if key in zero},
        },
    }
