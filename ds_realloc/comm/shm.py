"""Same-host all-reduce through DeepSpeed's shared-memory op, for tensor-parallel decoding on CPU.

A gloo all-reduce costs ~1.5 ms on this class of machine whatever its size, and a decoding step of
a tensor-parallel model makes two per layer. DeepSpeed's CPU accelerator ships a shared-memory
all-reduce (`ShareMemCommBuilder`, JIT-built by `deepspeed.init_distributed`; what DeepSpeed's own
CPU AutoTP inference calls through `deepspeed.comm.inference_all_reduce`) that takes ~10 us.

Its limits decide when we use it: it reduces over the whole job (not a sub-group), sums only, on
float tensors, and only when every rank is on one host, which it learns from `LOCAL_SIZE` when
DeepSpeed's communication backend starts (the deepspeed launcher sets it; so do our own launches,
which are supervised: a dead rank stops the others, as the op's spin-wait has no timeout), and never
with more ranks than cores (a spinning rank would hold the core its peer needs). Every
rank adds the ranks' buffers in rank order, so all ranks hold the same bits; with two ranks that is
bitwise the sum gloo computes. bf16 / fp16 need AVX-512 in the op; without it we reduce an fp32 copy
(for two ranks the same rounding as gloo's).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ds_realloc.utils.dist import shm_all_reduce_started


DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the op reduces (it skips others silently)


def _backend():
    from deepspeed.comm import comm as ds_comm

    return ds_comm.cdb


def available(group_size: int) -> bool:
    """Whether a group of `group_size` ranks can reduce through the shared-memory op: it is the
    whole job, the job is on one host with a core per rank, and DeepSpeed's backend built the op."""
    if group_size < 2 or not shm_all_reduce_started() or group_size != dist.get_world_size():
        return False
    if group_size > (os.cpu_count() or 1):  # its waits spin: more ranks than cores would starve the others
        return False
    return (getattr(_backend(), "shm_vector_kernel_level", 0) >= 1
            and hasattr(torch.ops, "deepspeed") and hasattr(torch.ops.deepspeed, "inference_all_reduce_"))


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` (CPU, one of DTYPES) over every rank of the job, in place."""
    if tensor.dtype not in DTYPES or tensor.device.type != "cpu":
        raise TypeError(f"the shared-memory all-reduce takes CPU {DTYPES}, not {tensor.device} {tensor.dtype}")
    if tensor.dtype == torch.float32 or _backend().shm_vector_kernel_level >= 2:
        if not tensor.is_contiguous():
            out = tensor.contiguous()
            torch.ops.deepspeed.inference_all_reduce_(out)
            return tensor.copy_(out)
        return torch.ops.deepspeed.inference_all_reduce_(tensor)
    wide = tensor.float()
    torch.ops.deepspeed.inference_all_reduce_(wide)
    return tensor.copy_(wide)
