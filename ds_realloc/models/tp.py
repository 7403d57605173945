"""Tensor-parallel building blocks that work on the shards a reallocation produced.

Column-parallel linears keep their output sharded; row-parallel ones all-reduce it (one all-reduce
per attention and per MLP). The embedding and LM head are vocab-parallel: rank k holds rows
[k*P, k*P + valid) of the vocabulary (P = ceil(V / tp), the last shard zero-padded), so log-probs,
argmax and sampling combine per-rank reductions instead of gathering [batch, vocab] logits.
Every TP rank of a group computes the same results (same inputs, same seed, same reductions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ds_realloc.comm import shm
from ds_realloc.models.linear import linear


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its tensor-parallel group (group None when tp = 1). With `shm`, float
    collectives go through the same-host shared-memory all-reduce (comm.shm; see `of`)."""

    size: int = 1
    rank: int = 0
    group: dist.ProcessGroup | None = None
    shm: bool = False

    @staticmethod
    def of(size: int, rank: int, group: dist.ProcessGroup | None) -> "TensorParallel":
        """The group's collectives on the fastest path this job has for them."""
        return TensorParallel(size, rank, group, size > 1 and shm.available(size))

    def _fast(self, tensor: torch.Tensor) -> bool:
        return self.shm and tensor.dtype in shm.DTYPES and tensor.device.type == "cpu"

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.size == 1:
            return tensor
        if self._fast(tensor) and op == dist.ReduceOp.SUM:
            return shm.all_reduce_sum_(tensor)
        if self._fast(tensor) and op == dist.ReduceOp.MAX:
            return tensor.copy_(self.all_gather(tensor).amax(0))
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[tp, *shape]: every rank's tensor, in tp-rank order."""
        if self.size == 1:
            return tensor.unsqueeze(0)
        if self._fast(tensor):  # a sum in which every rank fills only its own row: exact
            out = torch.zeros((self.size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
            out[self.rank] = tensor
            return shm.all_reduce_sum_(out)
        tensor = tensor.contiguous().view(1, *tensor.shape)
        out = torch.empty((self.size, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        dist.all_gather_into_tensor(out, tensor, group=self.group)  # concatenates along dim 0
        return out


def row_parallel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tp: TensorParallel) -> torch.Tensor:
    """y = sum over tp ranks of x_k @ W_k^T, then the (replicated) bias."""
    y = tp.all_reduce(linear(x, weight))
    return y if bias is None else y + bias


@dataclass(frozen=True)
class VocabShard:
    """Rows [start, start + valid) of the vocabulary live on this rank, in a table of `rows` rows."""

    start: int
    valid: int
    rows: int
    vocab: int

    @staticmethod
    def of(vocab: int, tp: TensorParallel) -> "VocabShard":
        rows = -(-vocab // tp.size)
        start = min(tp.rank * rows, vocab)
        return VocabShard(start, max(0, min(rows, vocab - start)), rows, vocab)


def vocab_embedding(ids: torch.Tensor, table: torch.Tensor, shard: VocabShard, tp: TensorParallel) -> torch.Tensor:
    """Embedding lookup with the table split by vocabulary rows: each rank fills its ids, then a sum."""
    local = ids - shard.start
    mine = (local >= 0) & (local < shard.valid)
    out = F.embedding(local.clamp(0, max(shard.rows - 1, 0)), table) * mine.unsqueeze(-1).to(table.dtype)
    return tp.all_reduce(out)


def local_logits(hidden: torch.Tensor, head: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """This rank's slice of the logits, fp32, with the padding rows of the last shard at -inf."""
    logits = linear(hidden, head).float()
    if shard.valid < shard.rows:
        logits[..., shard.valid:] = float("-inf")
    return logits


def logsumexp(logits: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """log sum_v exp(logits[..., v]) over the whole vocabulary (two small all-reduces)."""
    top = tp.all_reduce(logits.amax(-1), op=dist.ReduceOp.MAX)
    total = tp.all_reduce(torch.exp(logits - top.unsqueeze(-1)).sum(-1))
    return top + torch.log(total)


def pick(logits: torch.Tensor, tokens: torch.Tensor, shard: VocabShard, tp: TensorParallel) -> torch.Tensor:
    """logits[..., tokens] where each token's logit lives on the rank owning its vocabulary row."""
    local = tokens - shard.start
    mine = (local >= 0) & (local < shard.valid)
    values = logits.gather(-1, local.clamp(0, max(shard.rows - 1, 0)).unsqueeze(-1)).squeeze(-1)
    return tp.all_reduce(torch.where(mine, values, torch.zeros_like(values)))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, shard: VocabShard, tp: TensorParallel) -> torch.Tensor:
    """log softmax(logits)[tokens] over the full vocabulary, from vocab-parallel logits."""
    return pick(logits, tokens, shard, tp) - logsumexp(logits, tp)


def argmax(logits: torch.Tensor, shard: VocabShard, tp: TensorParallel) -> torch.Tensor:
    """The global argmax over the vocabulary (lowest id on ties, like torch.argmax): the first rank
    holding the largest value wins (lower ranks hold lower ids) and contributes its id to a sum."""
    values, index = logits.max(-1)
    if tp.size == 1:
        return index
    values = tp.all_gather(values)  # [tp, ...]
    winner = (values == values.amax(0, keepdim=True)).int().argmax(0)  # the first maximal rank
    mine = torch.where(winner == tp.rank, index + shard.start, torch.zeros_like(index))
    exact = torch.float32 if shard.vocab <= 2**24 else torch.float64  # ids are exact integers in it
    return tp.all_reduce(mine.to(exact)).long()
