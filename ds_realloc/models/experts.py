"""Expert parallelism for mixture-of-experts inference: which experts this rank holds, and moving
each routed token to the rank holding its expert and its output back (all-to-all inside the group).

An expert-parallel group is `size` ranks (data-parallel replicas otherwise, see layout/mesh.py) that
each hold experts [rank * E/size, (rank + 1) * E/size) of every MoE layer and their own tokens. The
ranks of a group take part in every MoE layer's exchange together, so they run the same number of
forward passes: generation continues until every rank of the group has finished (`all_finished`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ExpertParallel:
    """This rank's place in its expert-parallel group (group None when size = 1)."""

    size: int = 1
    rank: int = 0
    group: dist.ProcessGroup | None = None

    def all_finished(self, finished: bool) -> bool:
        """True once every rank of the group is finished (each rank says whether it is)."""
        if self.size == 1:
            return finished
        flag = torch.tensor([0 if finished else 1], dtype=torch.int32)
        dist.all_reduce(flag, group=self.group)
        return int(flag.item()) == 0

    def _exchange(self, tensor: torch.Tensor, receive: list[int], send: list[int]) -> torch.Tensor:
        """Rows of `tensor` sent in blocks of `send` rows to the group's ranks; `receive` rows come back."""
        out = tensor.new_empty((sum(receive), *tensor.shape[1:]))
        # 2-byte floats travel as their bits (not every backend reduces or exchanges bf16)
        wire = (lambda t: t.view(torch.int16)) if tensor.element_size() == 2 and tensor.is_floating_point() \
            else (lambda t: t)
        dist.all_to_all_single(wire(out), wire(tensor.contiguous()), receive, send, group=self.group)
        return out


def mixture(h: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, num_experts: int, ep: ExpertParallel,
            expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """sum_j weights[:, j] * expert_{experts[:, j]}(h) for tokens h [N, H] routed to experts [N, k]
    with weights [N, k], where `expert(local_index, x)` applies one of this rank's experts. Each token's
    contributions are added in expert order, whatever the expert-parallel degree, so results are the
    same at every degree."""
    tokens = torch.arange(h.shape[0], device=h.device).repeat_interleave(experts.shape[1])
    chosen, weight = experts.reshape(-1), weights.reshape(-1)
    order = torch.argsort(chosen, stable=True)  # expert-major (hence destination-major) order
    tokens, chosen, weight = tokens[order], chosen[order], weight[order]
    per = num_experts // ep.size
    if ep.size == 1:
        inputs, local = h[tokens], chosen
    else:
        send = torch.bincount(chosen // per, minlength=ep.size)
        receive = torch.empty_like(send)
        dist.all_to_all_single(receive, send, group=ep.group)
        send, receive = send.tolist(), receive.tolist()
        inputs = ep._exchange(h[tokens], receive, send)
        local = ep._exchange(chosen % per, receive, send)
    outputs = torch.empty_like(inputs)
    for index in local.unique().tolist():
        rows = torch.where(local == index)[0]
        outputs[rows] = expert(index, inputs[rows]).to(outputs.dtype)
    if ep.size > 1:
        outputs = ep._exchange(outputs, send, receive)
    out = torch.zeros_like(h)
    out.index_add_(0, tokens, (outputs * weight[:, None]).to(out.dtype))
    return out
