"""Executing reallocation plans with torch.distributed (gloo on CPU, NCCL on GPU).

Sources are flat buffers by name: the live ZeRO-3 partitions of a DeepSpeed model
(`zero3_sources`, read in place from `param.ds_tensor`, also when offloaded to CPU) or the output
of an earlier reallocation. Destinations are fresh buffers, or existing ones (`targets`, e.g.
another model's ZeRO-3 partitions) written in place or blended: dst = eta*src + (1-eta)*dst.

Work goes bucket by bucket (one pipeline unit, i.e. one layer, per bucket): a rank packs what each
peer needs into one contiguous send buffer per peer (the op_builder interval-copy kernel gathers
every span of a parameter in one call; without it, one strided copy per piece), posts all its
sends and receives of the bucket as one P2P batch, does its local copies meanwhile, then unpacks.
Memory above `sources + destination shards` is one bucket's send and receive buffers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn

from ds_realloc import ops
from ds_realloc.layout.layout import Layout
from ds_realloc.layout.plan import ReallocPlan, Transfer
from ds_realloc.layout.runs import Piece
from ds_realloc.utils.errors import ConfigError


def strided(flat: torch.Tensor, offset: int, stride: int, length: int, count: int) -> torch.Tensor:
    """The [count, length] view of `count` spans of a flat buffer starting `stride` apart."""
    return flat.as_strided((count, length), (stride, 1), flat.storage_offset() + offset)


def zero3_sources(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ZeRO-3 partitions of every parameter, in place (`param.ds_tensor`, flat)."""
    sources = {}
    for name, param in model.named_parameters():
        if not hasattr(param, "ds_tensor"):
            raise ConfigError(f"parameter '{name}' is not a ZeRO-3 partition (is the engine at zero_stage=3?)")
        if str(getattr(param.ds_tensor, "final_location", None)) in ("nvme", "OffloadDeviceEnum.nvme"):
            raise ConfigError(f"parameter '{name}' is swapped out to NVMe; reallocation reads CPU or GPU partitions")
        sources[name] = param.ds_tensor.data.view(-1)
    return sources


def check_zero3_layout(model: nn.Module, layout: Layout, rank: int) -> None:
    """The ZeRO-3 layout describes this engine: same partition index and partition sizes."""
    index = layout.coords(rank)[0]
    sizes = {b.name: b.numel for b in layout.buffers(rank)}
    for name, param in model.named_parameters():
        group_rank = dist.get_rank(group=param.ds_process_group)
        if group_rank != index or param.ds_tensor.numel() != sizes.get(name):
            raise ConfigError(f"the ZeRO-3 layout {layout} does not match the engine on rank {rank} for '{name}': "
                              f"partition {group_rank} of size {param.ds_tensor.numel()}, layout says {index} "
                              f"of size {sizes.get(name)}")


@functools.lru_cache(maxsize=1 << 16)
def _intervals(transfer: Transfer, source_side: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, lengths) of every span of a transfer's pieces, on its source or destination buffer."""
    starts = [torch.arange(p.count, dtype=torch.int64) * (p.src_stride if source_side else p.dst_stride)
              + (p.src if source_side else p.dst) for p in transfer.pieces]
    lengths = [torch.full((p.count,), p.length, dtype=torch.int64) for p in transfer.pieces]
    return torch.cat(starts), torch.cat(lengths)


# `bench ops`: for a regular piece (equal spans a fixed stride apart: every dim-0 / dim-1 shard) one
# strided torch copy is faster than the kernel (0.86x for the kernel, 10,000 spans); for irregular
# spans the kernel wins (5.3x against index_select with a cached index). So a transfer goes through
# the kernel only when it has many pieces.
KERNEL_MIN_PIECES = 4


def _kernel_copies(a: torch.Tensor, b: torch.Tensor, transfer: Transfer) -> bool:
    """Whether to pack / unpack `transfer` with the interval-copy kernel: it is loaded, can copy
    between `a` and `b` (same dtype and device, contiguous) and the transfer has at least
    KERNEL_MIN_PIECES pieces; otherwise one strided torch copy per piece is faster."""
    if len(transfer.pieces) < KERNEL_MIN_PIECES:
        return False
    if a.dtype != b.dtype or a.device != b.device or not (a.is_contiguous() and b.is_contiguous()):
        return False
    return ops.kernel("interval_copy", a.device.type) is not None


def _pack(transfers: list[Transfer], sources: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
    position = 0
    for transfer in transfers:
        source = sources[transfer.src_buffer]
        if _kernel_copies(source, out, transfer):  # all spans of the parameter in one call
            ops.interval_gather(source, *_intervals(transfer, True), out[position:position + transfer.numel])
            position += transfer.numel
            continue
        for p in transfer.pieces:
            n = p.length * p.count
            out[position:position + n].view(p.count, p.length).copy_(
                strided(source, p.src, p.src_stride, p.length, p.count))
            position += n


def _write(target: torch.Tensor, piece: Piece, incoming: torch.Tensor, ema: float | None) -> None:
    view = strided(target, piece.dst, piece.dst_stride, piece.length, piece.count)
    if ema is None:
        view.copy_(incoming)
    else:
        view.mul_(1.0 - ema).add_(incoming.to(view.dtype), alpha=ema)


def _unpack(transfers: list[Transfer], received: torch.Tensor, out: Mapping[str, torch.Tensor],
            ema: float | None) -> None:
    position = 0
    for transfer in transfers:
        target = out[transfer.dst_buffer]
        if ema is None and _kernel_copies(target, received, transfer):
            ops.interval_scatter(target, *_intervals(transfer, False), received[position:position + transfer.numel])
            position += transfer.numel
            continue
        for p in transfer.pieces:
            n = p.length * p.count
            _write(target, p, received[position:position + n].view(p.count, p.length), ema)
            position += n


def _copy_local(transfer: Transfer, sources: Mapping[str, torch.Tensor], out: Mapping[str, torch.Tensor],
                ema: float | None) -> None:
    source, target = sources[transfer.src_buffer], out[transfer.dst_buffer]
    for p in transfer.pieces:
        _write(target, p, strided(source, p.src, p.src_stride, p.length, p.count), ema)


def _numel(transfers: list[Transfer]) -> int:
    return sum(t.numel for t in transfers)


@dataclass
class ReallocStats:
    """What one execution did on this rank."""

    sent_elements: int = 0
    received_elements: int = 0
    local_elements: int = 0
    peak_bucket_bytes: int = 0  # largest send + receive buffers held at once


def reallocate(plan: ReallocPlan, sources: Mapping[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
               targets: Mapping[str, torch.Tensor] | None = None, ema: float | None = None,
               stats: ReallocStats | None = None) -> dict[str, torch.Tensor]:
    """Run this rank's part of `plan`; returns its destination buffers (flat, by name).

    Every rank of the source or destination layout must call it (others may, and do nothing).
    `targets` are written in place (blended with `ema` if given) instead of fresh buffers."""
    rank = dist.get_rank()
    if ema is not None and (targets is None or not 0.0 < ema <= 1.0):
        raise ValueError("ema blending needs existing targets and 0 < ema <= 1")
    element_bytes = torch.empty((), dtype=dtype).element_size()
    out: dict[str, torch.Tensor] = {}
    for bucket in plan.program(rank):
        for spec in bucket.buffers:
            if targets is not None:
                out[spec.name] = targets[spec.name]
            else:
                covered = sum(r.numel for m in spec.members for r in m.runs)
                buffer = torch.empty(spec.numel, dtype=dtype, device=device)
                out[spec.name] = buffer if covered == spec.numel else buffer.zero_()  # padded shard: zeros
        ops, received = [], {}
        for peer, transfers in bucket.send.items():
            packed = torch.empty(_numel(transfers), dtype=dtype, device=device)
            _pack(transfers, sources, packed)
            ops.append(dist.P2POp(dist.isend, packed, peer))
        for peer, transfers in bucket.recv.items():
            received[peer] = torch.empty(_numel(transfers), dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, received[peer], peer))
        requests = dist.batch_isend_irecv(ops) if ops else []
        for transfer in bucket.local:
            _copy_local(transfer, sources, out, ema)
        for request in requests:
            request.wait()
        for peer, transfers in bucket.recv.items():
            _unpack(transfers, received[peer], out, ema)
        if stats is not None:
            sent = sum(op.tensor.numel() for op in ops if op.op is dist.isend)
            stats.sent_elements += sent
            stats.received_elements += sum(t.numel() for t in received.values())
            stats.local_elements += _numel(bucket.local)
            stats.peak_bucket_bytes = max(stats.peak_bucket_bytes,
                                          (sent + sum(t.numel() for t in received.values())) * element_bytes)
    return out


def shaped(layout: Layout, rank: int, buffers: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Destination buffers viewed in their local shard shapes (e.g. [rows / tp, hidden])."""
    return {spec.name: buffers[spec.name].view(spec.shape) for spec in layout.buffers(rank) if spec.name in buffers}


@dataclass
class KeptWeights:
    """A reallocated copy and the version of the weights it was made from: reuse it while the
    source's version (e.g. its optimizer step count) is unchanged, reallocate otherwise."""

    layout: Layout
    version: object
    buffers: dict[str, torch.Tensor]

    def current(self, layout: Layout, version: object) -> bool:
        return layout == self.layout and version == self.version
