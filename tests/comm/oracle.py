"""Independent references for reallocation tests: shards cut from the full state dict with torch
slicing (not with the plan's runs), and buffers laid out from a layout's runs."""

from __future__ import annotations

import torch

from ds_realloc.layout.layout import Layout
from ds_realloc.layout.model import ParamInfo
from ds_realloc.layout.sharding import FusedSplit, KVHeads, Replicated, Split


def reference_shard(info: ParamInfo, full: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    """The tensor-parallel shard of a full parameter, by torch indexing."""
    rule = info.rule
    if isinstance(rule, Replicated) or tp == 1:
        return full
    if isinstance(rule, Split):
        part = -(-full.shape[rule.dim] // tp)
        piece = full.narrow(rule.dim, min(tp_rank * part, full.shape[rule.dim]),
                            max(0, min(part, full.shape[rule.dim] - tp_rank * part)))
        if piece.shape[rule.dim] < part:  # uneven vocab split: zero padded
            pad = list(piece.shape)
            pad[rule.dim] = part - piece.shape[rule.dim]
            piece = torch.cat([piece, torch.zeros(pad, dtype=full.dtype)], dim=rule.dim)
        return piece
    if isinstance(rule, KVHeads):
        heads = full.view(rule.n_kv, rule.head_dim, *full.shape[1:])
        if rule.n_kv % tp == 0:
            return heads.chunk(tp)[tp_rank].reshape(-1, *full.shape[1:])
        return heads[tp_rank // (tp // rule.n_kv)].reshape(-1, *full.shape[1:])
    if isinstance(rule, FusedSplit):
        sections = full.chunk(rule.sections, dim=rule.dim)
        return torch.cat([s.chunk(tp, dim=rule.dim)[tp_rank] for s in sections], dim=rule.dim)
    raise TypeError(rule)


def expected_buffers(layout: Layout, rank: int, state: dict[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    """What every destination buffer of `rank` must hold: ZeRO-3 partitions by flat slicing, tensor
    shards by `reference_shard`, fused buffers as the concatenation of their members."""
    out = {}
    for spec in layout.buffers(rank):
        if layout.strategy.zero3:
            flat = state[spec.members[0].param].reshape(-1).to(dtype)
            index = layout.coords(rank)[0]
            part = flat[index * spec.numel:(index + 1) * spec.numel]
            out[spec.name] = torch.cat([part, torch.zeros(spec.numel - part.numel(), dtype=dtype)])
            continue
        dp, tp_rank, _ = layout.coords(rank)
        ep = layout.strategy.ep
        pieces = []
        for m in spec.members:
            info, full = layout.model.param(m.param), state[m.param]
            if info.experts and ep > 1:  # this ep rank's experts, then their tensor-parallel shard
                full = full.chunk(ep, dim=0)[dp % ep]
            pieces.append(reference_shard(info, full, layout.strategy.tp, tp_rank).reshape(-1))
        out[spec.name] = torch.cat(pieces).to(dtype)
    return out


def source_buffers(layout: Layout, rank: int, state: dict[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    """A rank's buffers of a layout, filled from the full state dict by the layout's runs."""
    out = {}
    for spec in layout.buffers(rank):
        buffer = torch.zeros(spec.numel, dtype=dtype)
        for member in spec.members:
            flat = state[member.param].reshape(-1).to(dtype)
            for run in member.runs:
                for j in range(run.count):
                    buffer[run.local + j * run.local_stride:][:run.length] = \
                        flat[run.full + j * run.full_stride:][:run.length]
        out[spec.name] = buffer
    return out
