"""Config groups of the engine layer: how a model is trained (ZeRO, precision) and optimised."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ds_realloc.utils.config import invalid, option


@dataclass
class EngineConfig:
    """DeepSpeed ZeRO settings. A JSON file in `deepspeed_config` (or accelerate's DeepSpeed plugin
    under `accelerate launch`) overrides the DeepSpeed config built from these fields."""

    zero_stage: int = option(3, "DeepSpeed ZeRO stage: 0, 1, 2 or 3")
    offload_optimizer: bool = option(False, "keep optimizer states on CPU and step with DeepSpeedCPUAdam (ZeRO-Offload; "
                                            "always so on a CPU-only machine with zero_stage >= 1)")
    offload_param: bool = option(False, "keep ZeRO-3 parameter partitions on CPU between uses (stage 3 only)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = option(
        "auto", "training precision; auto = bf16 where the GPU or CPU (AVX512-BF16 / AMX) computes it natively, "
                "else fp32")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    router_aux_loss_coef: float | None = option(
        None, "mixture-of-experts models: weight of the router's load-balancing loss in every training loss of a "
              "language model (aggregated like that loss); default the model's config.json router_aux_loss_coef; "
              "0 = none")
    deepspeed_config: str | None = option(None, "a DeepSpeed JSON config whose keys override the generated ones")
    inference: Literal["realloc", "zero3"] = option(
        "realloc", "how generate / inference calls get their weights: realloc = reallocated into each call's layout "
                   "(ours); zero3 = DeepSpeed-Chat's mechanism, no reallocation: generation gathers the ZeRO-3 model "
                   "once and runs HF generate, scoring runs ZeRO-3 forwards of the engines (each call on its model's "
                   "mesh, one replica per rank; the baseline of bench rlhf)")

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise invalid("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise invalid("router_aux_loss_coef", f"must be >= 0, got {self.router_aux_loss_coef}")
        if self.offload_param and self.zero_stage != 3:
            raise invalid("offload_param", "parameter offload needs zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise invalid("offload_optimizer", "optimizer offload needs zero_stage 1, 2 or 3")


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay (DeepSpeed's WarmupCosineLR)."""

    lr: float = option(1e-5, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    warmup_steps: int = option(0, "optimizer steps of linear warmup from 0 to lr")
    min_lr_ratio: float = option(0.1, "learning rate at the end of the cosine decay, as a fraction of lr")
    grad_clip: float = option(1.0, "clip the global gradient norm to this value (0 = no clipping)")

    def validate(self) -> None:
        if self.lr <= 0:
            raise invalid("lr", f"must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise invalid("min_lr_ratio", f"must be within [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise invalid("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.grad_clip < 0:
            raise invalid("grad_clip", f"must be >= 0, got {self.grad_clip}")
