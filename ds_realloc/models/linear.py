"""`linear(x, W, b)`: F.linear, with the weight-major product for few rows and large weights on CPU.

Decoding multiplies a handful of rows (one token per sequence) by every weight matrix. On CPU,
torch's GEMM for `x @ W^T` handles a few rows roughly row by row, so its time grows with the rows
although the weight is read once; the transposed product `(W @ x^T)^T` streams the weight once for
all of them. Measured on this project's 2-core Sapphire Rapids (torch 2.13, one thread per rank,
weights cycled through 768 MB so that none is cached), the transposed product takes 0.7-1.0x
F.linear's time from 8 to 32 rows for every weight of at least 3 * 2^18 elements in LLaMA-100m and
SmolLM2 (and up to 1.2x longer for smaller weights, 1.8x below 4 rows, 1.4x at 64), so that is
where it is used; `bench generate` shows the effect end to end. The rule depends on shapes only,
so a seeded run repeats exactly. Both compute the same sums (the last bit can differ, from the
order of accumulation); GPU inputs, smaller weights (every test model), other row counts and
anything that needs a gradient go straight to F.linear.

A non-contiguous input (the last positions of a batch of hidden states, which the LM head of a
scoring call reads) is made contiguous first: on CPU, torch's bf16 linear on such a view of
[8, 16, 576] took 1.35 s against 0.02 s for its contiguous copy (SmolLM2's LM head, one thread),
which made a reference scoring call of 8 rows take seconds; `ds-realloc profile`'s scoring times
showed it.
"""

from __future__ import annotations

import torch

MIN_WEIGHT = 3 << 18
ROWS = (8, 32)
# torch's own linear: DeepSpeed ZeRO-3 replaces torch.nn.functional.linear process-wide with an autograd
# Function (LinearFunctionForZeroStage3, to save activation memory in training), which only adds Python
# overhead to the inference modules' calls (~30 us each, measured in a decode step profile)
_native_linear = torch._C._nn.linear


def uses_transposed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` computes this call as (W @ x^T)^T."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (x.device.type == "cpu" and weight.dim() == 2 and weight.numel() >= MIN_WEIGHT
            and ROWS[0] <= rows <= ROWS[1]
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias, by the faster of the two products for this shape (see the module doc)."""
    if x.device.type == "cpu" and not x.is_contiguous():
        x = x.contiguous()
    if not uses_transposed(x, weight):
        return _native_linear(x, weight, bias)
    y = (weight @ x.reshape(-1, x.shape[-1]).t()).t().contiguous()
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], weight.shape[0])
