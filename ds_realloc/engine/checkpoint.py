"""Checkpoints: HF folders written from any ZeRO stage one parameter at a time, and DeepSpeed
training states that `--resume` continues exactly."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ds_realloc.engine.deepspeed_compat import scoped_to
from ds_realloc.models.hf_io import ShardedWriter, write_hf_metadata
from ds_realloc.models.value_head import hf_model_of
from ds_realloc.utils.dist import comm_device
from ds_realloc.utils.errors import UserError
from ds_realloc.utils.logging import get_logger

logger = get_logger(__name__)


def _full_param_on_writer(param: nn.Parameter, writer: int) -> torch.Tensor | None:
    """The whole parameter on global rank `writer` (None elsewhere); a ZeRO-3 parameter is gathered
    from its partitions with one `gather`, so only the writer ever holds it whole."""
    if not hasattr(param, "ds_id"):
        return param.data if dist.get_rank() == writer else None
    group = param.ds_process_group
    part = param.ds_tensor.data.to(comm_device())
    gathered = None
    if dist.get_rank() == writer:
        gathered = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
    dist.gather(part, gathered, dst=writer, group=group)
    if gathered is None:
        return None
    return torch.cat(gathered)[: param.ds_numel].view(param.ds_shape)


def save_hf_model(module: nn.Module, tokenizer, out_dir: str | Path, writer: int = 0,
                  max_shard_bytes: int = 5 * 2**30, group: dist.ProcessGroup | None = None) -> None:
    """Save `module` as an HF folder (sharded safetensors, config, tokenizer); every rank of the
    model's `group` (default: the world) calls it, rank `writer` receives one parameter at a time
    and writes shards as they fill. Ranks outside the group must not call it."""
    hf = hf_model_of(module)
    is_writer = dist.get_rank() == writer
    shards = ShardedWriter(out_dir, max_shard_bytes, hf.config.model_type) if is_writer else None
    dtype = None
    for name, param in hf.named_parameters():
        full = _full_param_on_writer(param, writer)
        if shards is not None:
            shards.add(name, full)
            dtype = full.dtype
    persistent = hf.state_dict().keys()
    for name, buffer in hf.named_buffers():
        if shards is not None and name in persistent:
            shards.add(name, buffer)
    if is_writer:
        shards.close()
        write_hf_metadata(hf, tokenizer, out_dir, dtype)
        logger.info("saved HF checkpoint to %s", out_dir)
    dist.barrier(group=group)


def save_training_state(engine, checkpoint_dir: str | Path, tag: str, client_state: dict) -> None:
    """DeepSpeed checkpoint (module, optimizer, LR schedule; ZeRO partitions per rank) plus our state.
    The engine's first rank creates the folder and writes `latest` (DeepSpeed would use global rank 0,
    which need not belong to the engine's mesh)."""
    first = engine.mpu.get_data_parallel_rank() == 0
    (Path(checkpoint_dir) / tag).mkdir(parents=True, exist_ok=True)
    with scoped_to(engine.mpu):
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state, save_latest=False)
        if first:
            (Path(checkpoint_dir) / "latest").write_text(tag)
        dist.barrier(group=engine.mpu.get_data_parallel_group())


def load_training_state(engine, checkpoint_dir: str | Path, tag: str | None = None) -> dict:
    """Restore a DeepSpeed checkpoint (`tag`, default: the one `latest` names); returns its client state."""
    with scoped_to(engine.mpu):
        path, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    if path is None:
        raise UserError(f"--resume: no DeepSpeed checkpoint {tag or 'latest'} in {checkpoint_dir}")
    return client_state
