"""Reading and writing HF checkpoint folders tensor by tensor.

`CheckpointReader.read_flat(name, start, end)` reads one flat range of one tensor (e.g. a ZeRO-3
partition) from safetensors through memory-mapped row slices, never the whole file.
`ShardedWriter` writes `model.safetensors` or `model-0000i-of-0000n.safetensors` plus the index,
holding at most one shard in memory. Both speak live (in-memory) tensor names: a fused expert
tensor is read from, and written as, its published per-expert tensors (`models/published.py`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ds_realloc.models.published import COUNT_KEYS, EXPERT_NAMES, live_shape, published_names, split_published
from ds_realloc.utils.errors import ModelError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


def _row_numel(shape) -> int:
    """Elements of one index along dim 0 (a row of the row-major flattening)."""
    row = 1
    for dim in shape[1:]:
        row *= dim
    return row


class CheckpointReader:
    """Tensors of an HF folder (safetensors, or legacy .bin via mmap) addressed by name."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._files: dict[str, str] = {}  # tensor name -> file name
        self._handles: dict[str, object] = {}
        self.elements_read = 0  # elements materialised from the files (what a shard read costs)
        for index_name, single_name in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
            index, single = self.model_dir / index_name, self.model_dir / single_name
            if index.is_file():
                self._files = dict(json.loads(index.read_text())["weight_map"])
                break
            if single.is_file():
                self._files = {name: single_name for name in self._open(single_name).keys()}
                break
        if not self._files:
            raise ModelError(f"{self.model_dir} has no model weights ({SAFE_SINGLE}, {SAFE_INDEX} or {BIN_SINGLE})")
        config = self.model_dir / "config.json"
        config = json.loads(config.read_text()) if config.is_file() else {}
        self.model_type = config.get("model_type")
        counts = [config[key] for key in COUNT_KEYS if key in config] if self.model_type in EXPERT_NAMES else []
        self._num_experts = int(counts[0]) if counts else 0
        self._pieces: dict[str, list[str]] = {}  # live name -> its published tensors, where they differ

    def _open(self, file_name: str):
        if file_name not in self._handles:
            path = self.model_dir / file_name
            if file_name.endswith(".safetensors"):
                self._handles[file_name] = safe_open(str(path), framework="pt")
            else:
                self._handles[file_name] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._handles[file_name]

    def names(self) -> set[str]:
        return set(self._files)

    def resolve(self, name: str, base_prefix: str) -> str | None:
        """The key of a model parameter here: its name as is, or with the base-model prefix added or
        removed (GPT-2 checkpoints are saved both as `h.0...` and `transformer.h.0...`); a fused
        expert tensor stored as its published per-expert tensors resolves to its live name."""
        prefix = base_prefix + "."
        for candidate in (name, name.removeprefix(prefix), prefix + name):
            if candidate in self._files or candidate in self._pieces:
                return candidate
            pieces = published_names(candidate, self.model_type, self._num_experts)
            if pieces and pieces != [candidate] and all(piece in self._files for piece in pieces):
                self._pieces[candidate] = pieces
                return candidate
        return None

    def where(self, name: str) -> str:
        return str(self.model_dir / self._files[self._pieces.get(name, [name])[0]])

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        handle = self._open(self._files[name])
        if isinstance(handle, dict):
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._pieces:
            return live_shape(name, [self._stored_shape(p) for p in self._pieces[name]], self._num_experts)
        return self._stored_shape(name)

    def read(self, name: str) -> torch.Tensor:
        if name in self._pieces:
            shape = self.shape(name)
            return self.read_flat(name, 0, torch.Size(shape).numel()).view(shape)
        handle = self._open(self._files[name])
        tensor = handle[name] if isinstance(handle, dict) else handle.get_tensor(name)
        self.elements_read += tensor.numel()
        return tensor

    def read_strided(self, name: str, offset: int, stride: int, length: int, count: int) -> torch.Tensor:
        """The [count, length] spans of the row-major flattening starting at `offset`, `stride` apart
        (a tensor-parallel shard: rows of a dim-0 split, columns of a dim-1 split), reading only
        those spans when they are columns of the tensor's rows, else the rows that hold them."""
        handle = self._open(self._files[name]) if name not in self._pieces else None
        if handle is None or isinstance(handle, dict) or count == 1 or stride == length:
            flat = self.read_flat(name, offset, offset + (count - 1) * stride + length)
            return flat.as_strided((count, length), (stride, 1))
        tensor_slice = handle.get_slice(name)
        shape = tensor_slice.get_shape()
        row = _row_numel(shape)
        column = offset % row
        if len(shape) == 2 and stride == row and column + length <= row:
            first = offset // row
            block = tensor_slice[first:first + count, column:column + length]
            self.elements_read += block.numel()
            return block.reshape(count, length)
        flat = self.read_flat(name, offset, offset + (count - 1) * stride + length)
        return flat.as_strided((count, length), (stride, 1))

    def read_flat(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the row-major flattening of a tensor, reading only the rows that hold them."""
        if name in self._pieces:
            return self._read_pieces(self._pieces[name], start, end)
        handle = self._open(self._files[name])
        if isinstance(handle, dict):
            self.elements_read += end - start
            return handle[name].reshape(-1)[start:end]
        tensor_slice = handle.get_slice(name)
        shape = tensor_slice.get_shape()
        if len(shape) <= 1:
            self.elements_read += end - start
            return tensor_slice[start:end].reshape(-1)
        row = _row_numel(shape)
        first, last = start // row, -(-end // row)
        rows = tensor_slice[first:last].reshape(-1)
        self.elements_read += rows.numel()
        return rows[start - first * row:end - first * row]

    def _read_pieces(self, pieces: list[str], start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the concatenated flattenings of `pieces`, from the pieces they lie in."""
        parts, offset = [], 0
        for piece in pieces:
            numel = torch.Size(self._stored_shape(piece)).numel()
            lo, hi = max(start, offset), min(end, offset + numel)
            if lo < hi:
                parts.append(self.read_flat(piece, lo - offset, hi - offset))
            offset += numel
            if offset >= end:
                break
        return torch.cat(parts) if len(parts) > 1 else parts[0] if parts else torch.empty(0)


class ShardedWriter:
    """Writes named tensors into safetensors shards of at most `max_shard_bytes` (HF file naming),
    each live tensor under its published names for `model_type`."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30, model_type: str | None = None):
        self.out_dir = Path(out_dir)
        self.model_type = model_type
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in list(self.out_dir.glob("model*.safetensors")) + [self.out_dir / SAFE_INDEX]:
            stale.unlink(missing_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []  # tensor names per written shard
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        for published, piece in split_published(name, tensor, self.model_type):
            nbytes = piece.numel() * piece.element_size()
            if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
                self._flush()
            self._pending[published] = piece.detach().to("cpu").contiguous()
            self._pending_bytes += nbytes
            self._total_bytes += nbytes

    def _temp_name(self, i: int) -> Path:
        return self.out_dir / f"model-part{i:05d}.safetensors.tmp"

    def _flush(self) -> None:
        save_file(self._pending, str(self._temp_name(len(self._shards))), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard, give shards their final names and write the index when there are several."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            final = [self.out_dir / SAFE_SINGLE]
        else:
            final = [self.out_dir / f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for i, path in enumerate(final):
            os.replace(self._temp_name(i), path)
        if count > 1:
            weight_map = {name: final[i].name for i, names in enumerate(self._shards) for name in names}
            index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
            (self.out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        return final


def write_hf_metadata(model, tokenizer, out_dir: str | Path, dtype: torch.dtype | None = None) -> None:
    """config.json, generation_config.json and the tokenizer files of an HF folder. (These writers do
    not depend on the torch.distributed rank; `PreTrainedModel.save_pretrained` writes nothing on a
    rank other than 0, so no HF folder of ours is written through it.)"""
    if dtype is not None:
        model.config.dtype = dtype
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def save_hf_folder(model, tokenizer, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """An HF folder of a whole in-memory model, written by the calling process whatever its rank:
    parameters (tied ones once, as HF stores them), persistent buffers, config and tokenizer."""
    shards = ShardedWriter(out_dir, max_shard_bytes, model.config.model_type)
    dtype = None
    for name, param in model.named_parameters():
        shards.add(name, param.data)
        dtype = param.dtype
    persistent = model.state_dict().keys()
    for name, buffer in model.named_buffers():
        if name in persistent:
            shards.add(name, buffer)
    shards.close()
    write_hf_metadata(model, tokenizer, out_dir, dtype)
