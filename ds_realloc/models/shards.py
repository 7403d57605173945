"""A rank's buffers of a layout, read straight from an HF checkpoint (one parameter at a time)."""

from __future__ import annotations

from pathlib import Path

import torch

from ds_realloc.comm.realloc import strided
from ds_realloc.layout.layout import Layout
from ds_realloc.models.hf_io import CheckpointReader
from ds_realloc.utils.errors import ModelError


def load_shards(model_dir: Path, layout: Layout, rank: int, dtype: torch.dtype, device,
                base_prefix: str, reader: CheckpointReader | None = None) -> dict[str, torch.Tensor]:
    """{buffer name: tensor in its local shape} of `rank` in `layout`, from the checkpoint in
    `model_dir`, reading only the spans of this rank's shard (`CheckpointReader.read_strided`)."""
    reader = reader or CheckpointReader(model_dir)
    out = {}
    tied = layout.model.tied_head[1] if layout.model.tied_head else None
    spans_read: dict[tuple, torch.Tensor] = {}  # tied embeddings: read once for the embedding and the head
    for spec in layout.buffers(rank):
        buffer = torch.zeros(spec.numel, dtype=dtype, device=device)
        for member in spec.members:
            key = reader.resolve(member.param, base_prefix)
            if key is None:
                raise ModelError(f"{model_dir}: the checkpoint has no tensor for parameter '{member.param}'")
            for run in member.runs:
                where = (key, run.full, run.full_stride, run.length, run.count)
                spans = spans_read.get(where)
                if spans is None:
                    spans = reader.read_strided(key, *where[1:])
                    if member.param == tied:
                        spans_read[where] = spans
                strided(buffer, run.local, run.local_stride, run.length, run.count).copy_(spans)
        out[spec.name] = buffer.view(spec.shape)
    return out
