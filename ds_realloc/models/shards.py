"""A rank's buffers of a layout, read straight from an HF checkpoint (one parameter at a time)."""

from __future__ import annotations

from pathlib import Path

import torch

from ds_realloc.comm.realloc import strided
from ds_realloc.layout.layout import Layout
from ds_realloc.models.hf_io import CheckpointReader
from ds_realloc.utils.errors import ModelError


def load_shards(model_dir: Path, layout: Layout, rank: int, dtype: torch.dtype, device,
                base_prefix: str) -> dict[str, torch.Tensor]:
    """{buffer name: tensor in its local shape} of `rank` in `layout`, from the checkpoint in `model_dir`."""
    reader = CheckpointReader(model_dir)
    out = {}
    for spec in layout.buffers(rank):
        buffer = torch.zeros(spec.numel, dtype=dtype, device=device)
        for member in spec.members:
            key = reader.resolve(member.param, base_prefix)
            if key is None:
                raise ModelError(f"{model_dir}: the checkpoint has no tensor for parameter '{member.param}'")
            full = reader.read(key).to(device=device, dtype=dtype).reshape(-1)
            for run in member.runs:
                strided(buffer, run.local, run.local_stride, run.length, run.count).copy_(
                    strided(full, run.full, run.full_stride, run.length, run.count))
        out[spec.name] = buffer.view(spec.shape)
    return out
