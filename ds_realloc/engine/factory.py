"""DeepSpeed engines per model role: trained models (ZeRO 0-3, offload) and frozen ones
(reference / reward) that keep their weights on CPU while idle."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import deepspeed
import torch.distributed as dist
from torch import nn

from ds_realloc.engine.deepspeed_compat import patch_deepspeed, scoped_to
from ds_realloc.engine.ds_config import torch_dtype, zero_stage
from ds_realloc.engine.loading import instantiate
from ds_realloc.models.registry import Head
from ds_realloc.models.router_loss import router_loss_for
from ds_realloc.models.value_head import hf_model_of
from ds_realloc.utils.dist import DataParallelMPU, comm_device


def build_train_engine(model_dir: Path, head: Head, ds_config: dict, lr_schedule: Callable | None = None,
                       gradient_checkpointing: bool = False, pad_token_id: int | None = None,
                       dp_group: dist.ProcessGroup | None = None, router_aux_loss_coef: float | None = None):
    """A DeepSpeed training engine for the model in `model_dir`, built from a final DeepSpeed config;
    `lr_schedule(optimizer)` makes the LR scheduler unless the config names its own "scheduler". A
    mixture-of-experts language model's engine carries `router_loss` (models/router_loss.py; None
    otherwise), which training adds to its loss."""
    patch_deepspeed()
    zero3 = ds_config if zero_stage(ds_config) == 3 else None
    mpu = DataParallelMPU(dp_group or dist.group.WORLD)
    module = instantiate(model_dir, head, torch_dtype(ds_config), zero3, pad_token_id, mpu)
    if gradient_checkpointing:
        hf_model_of(module).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with scoped_to(mpu):
        engine, *_ = deepspeed.initialize(model=module, config=ds_config, mpu=mpu,
                                          model_parameters=[p for p in module.parameters() if p.requires_grad],
                                          lr_scheduler=None if "scheduler" in ds_config else lr_schedule)
    engine.router_loss = router_loss_for(module, head, router_aux_loss_coef)
    return engine


class FrozenModel:
    """A no-grad model. Under ZeRO-3 it is a DeepSpeed engine without optimizer whose partitions may
    live on CPU (`offload_param`); otherwise a replica, kept on CPU when offloaded. Inference runs on
    layouts reallocated from these weights (the hybrid engine), which reads them where they are."""

    def __init__(self, module: nn.Module, ds_config: dict, offload: bool, mpu: DataParallelMPU):
        module.requires_grad_(False)
        self.zero3 = zero_stage(ds_config) == 3
        self.offload = offload and not self.zero3
        if self.zero3:
            with scoped_to(mpu):
                self._engine, *_ = deepspeed.initialize(model=module, config=ds_config, mpu=mpu)
            self.module = self._engine.module
        else:
            self._engine = None
            self.module = module.to(torch_dtype(ds_config)).to("cpu" if self.offload else comm_device())
        self.module.eval()


def build_frozen_model(model_dir: Path, head: Head, ds_config: dict, offload: bool,
                       pad_token_id: int | None = None, dp_group: dist.ProcessGroup | None = None) -> FrozenModel:
    """A frozen model (reference, reward) for the model in `model_dir`."""
    patch_deepspeed()
    zero3 = ds_config if zero_stage(ds_config) == 3 else None
    mpu = DataParallelMPU(dp_group or dist.group.WORLD)
    module = instantiate(model_dir, head, torch_dtype(ds_config), zero3, pad_token_id, mpu)
    return FrozenModel(module, ds_config, offload, mpu)
