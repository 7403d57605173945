"""The kernels of `op_builder`, each with an exact torch fallback.

`interval_gather` / `interval_scatter` (many `[start, start + length)` intervals of a flat tensor
to and from one contiguous buffer), `gae` (advantages and returns of a packed batch) and
`token_logprobs` (log-probs of the chosen tokens, and optionally the entropy, from logits, without
the [tokens, vocab] fp32 log-softmax; differentiable). Each call uses the JIT-built kernel for the
tensors' device when it can be built and loaded; otherwise it warns once and runs the torch
reference, which gives the same result. `DS_REALLOC_DISABLE_OPS=1` forces the references.
"""

from __future__ import annotations

import importlib
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

_LOADED: dict[tuple[str, str], Any] = {}
_FAILED: dict[tuple[str, str], str] = {}


def ops_disabled() -> bool:
    return os.environ.get("DS_REALLOC_DISABLE_OPS", "0") not in ("", "0")


STALE_LOCK_S = 300.0  # a JIT build takes ~30 s (CPU) to a few minutes (CUDA); an older lock outlived its build


def _build_lock(name: str) -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False)) / "lock"


def wait_for_build_lock(name: str, poll_s: float = 0.5) -> None:
    """Wait while another process builds `name`, but not forever: torch waits without limit on the lock
    file of a build, and a build killed midway (Ctrl-C, a stopped job) leaves it behind, so every later
    run would hang. A lock older than STALE_LOCK_S is removed with a warning and this process builds."""
    lock = _build_lock(name)
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_LOCK_S:
            warnings.warn(f"removing the stale build lock {lock} ({age:.0f} s old, left by a build that did not "
                          f"finish); building {name} here", RuntimeWarning, stacklevel=2)
            lock.unlink(missing_ok=True)
            return
        time.sleep(poll_s)


def kernel(op: str, device_type: str = "cpu"):
    """The loaded extension of `op` for a device type, or None (disabled, incompatible, failed build)."""
    key = (op, device_type)
    if ops_disabled() or key in _FAILED or device_type not in ("cpu", "cuda"):
        return None
    if key not in _LOADED:
        from op_builder.builder import OPS

        builder = OPS[op][0 if device_type == "cpu" else 1]()
        try:
            _LOADED[key] = importlib.import_module(builder.absolute_name())  # pre-built at install
        except ImportError:
            pass
        try:
            if key not in _LOADED:
                if not builder.is_compatible():
                    raise RuntimeError("not compatible with this machine")
                wait_for_build_lock(builder.name)
                _LOADED[key] = builder.load(verbose=False)
        except Exception as error:  # noqa: BLE001 - any build failure means: use the reference
            _FAILED[key] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            warnings.warn(f"ds_realloc op '{builder.NAME}' is unavailable ({_FAILED[key]}); using the torch "
                          f"reference", RuntimeWarning, stacklevel=3)
            return None
    return _LOADED[key]


# -- interval copy ---------------------------------------------------------------------------------------


def interval_gather_reference(flat: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                              out: torch.Tensor) -> torch.Tensor:
    pieces = [flat[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist())]
    if pieces:
        torch.cat(pieces, out=out[:int(lengths.sum())])
    return out


def interval_scatter_reference(flat: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                               packed: torch.Tensor) -> torch.Tensor:
    position = 0
    for s, n in zip(starts.tolist(), lengths.tolist()):
        flat[s:s + n].copy_(packed[position:position + n])
        position += n
    return flat


def interval_gather(flat: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """`out[...] = cat(flat[s:s + n] for each interval)`; `out` defaults to a fresh buffer."""
    if out is None:
        out = torch.empty(int(lengths.sum()), dtype=flat.dtype, device=flat.device)
    op = kernel("interval_copy", flat.device.type) if flat.is_contiguous() and out.is_contiguous() else None
    if op is None:
        return interval_gather_reference(flat, starts, lengths, out)
    op.gather(flat, starts.to(torch.int64), lengths.to(torch.int64), out)
    return out


def interval_scatter(flat: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                     packed: torch.Tensor) -> torch.Tensor:
    """`flat[s:s + n] = next n elements of packed` for each interval, in order; returns `flat`."""
    op = kernel("interval_copy", flat.device.type) if flat.is_contiguous() and packed.is_contiguous() else None
    if op is None:
        return interval_scatter_reference(flat, starts, lengths, packed)
    op.scatter(flat, starts.to(torch.int64), lengths.to(torch.int64), packed)
    return flat


# -- packed GAE ------------------------------------------------------------------------------------------


def gae_loop(rewards: torch.Tensor, values: torch.Tensor, cu_seqlens: torch.Tensor, truncated: torch.Tensor,
             gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE by the definition, a Python loop over tokens: the oracle of the tests and benchmark."""
    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)
    bounds = cu_seqlens.tolist()
    for i in range(len(bounds) - 1):
        start, end = bounds[i], bounds[i + 1]
        v = values[start + i:end + i + 1]
        following = v[-1] if bool(truncated[i]) else v.new_zeros(())
        last = v.new_zeros(())
        for t in reversed(range(end - start)):
            last = rewards[start + t] + gamma * following - v[t] + gamma * lam * last
            advantages[start + t] = last
            following = v[t]
        returns[start:end] = advantages[start:end] + v[:-1]
    return advantages, returns


def gae_reference(rewards: torch.Tensor, values: torch.Tensor, cu_seqlens: torch.Tensor, truncated: torch.Tensor,
                  gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised torch GAE: the sequences left-aligned in a [B, L] grid, one backward scan over the
    L columns with every sequence at once."""
    device = rewards.device
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(device)
    batch = len(lengths)
    width = int(lengths.max()) if batch else 0
    if width == 0:
        return torch.zeros_like(rewards), torch.zeros_like(rewards)
    starts = cu_seqlens[:-1].long().to(device)
    rows = torch.arange(batch, device=device).repeat_interleave(lengths)
    cols = torch.arange(len(rewards), device=device) - starts.repeat_interleave(lengths)
    value_rows = torch.arange(batch, device=device).repeat_interleave(lengths + 1)
    value_cols = torch.arange(len(values), device=device) - (starts + torch.arange(batch, device=device)) \
        .repeat_interleave(lengths + 1)
    r = rewards.new_zeros(batch, width)
    r[rows, cols] = rewards
    v = values.new_zeros(batch, width + 1)
    v[value_rows, value_cols] = values
    ended = ~truncated.to(device=device, dtype=torch.bool)
    v[torch.arange(batch, device=device)[ended], lengths[ended]] = 0  # EOS: no value after the last action
    advantages = r.new_zeros(batch, width)
    last = r.new_zeros(batch)
    for j in range(width - 1, -1, -1):  # entries past a row's end stay 0, so its scan starts at 0
        last = (r[:, j] + gamma * v[:, j + 1] - v[:, j] + gamma * lam * last) * (j < lengths)
        advantages[:, j] = last
    flat = advantages[rows, cols]
    return flat, flat + v[rows, cols]


def gae(rewards: torch.Tensor, values: torch.Tensor, cu_seqlens: torch.Tensor, truncated: torch.Tensor,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [N] of a packed batch: rewards [N], values [N + B] (n + 1 per sequence),
    cu_seqlens [B + 1], truncated [B] (bootstrap from the last value instead of 0)."""
    usable = rewards.dtype in (torch.float32, torch.float64) and values.dtype == rewards.dtype
    if rewards.device.type == "cuda":
        usable = rewards.dtype == torch.float32
    op = kernel("gae", rewards.device.type) if usable else None
    if op is None:
        return gae_reference(rewards, values, cu_seqlens, truncated, gamma, lam)
    advantages, returns = op.gae(rewards, values, cu_seqlens, truncated, float(gamma), float(lam))
    return advantages, returns


# -- fused log-probs -------------------------------------------------------------------------------------


def token_logprobs_reference(logits: torch.Tensor, targets: torch.Tensor,
                             entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    logp = torch.log_softmax(logits.float(), -1)
    chosen = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return chosen, (-(logp.exp() * logp).sum(-1) if entropy else None)


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, entropy: bool, op, inplace_grad: bool):
        logprobs, entropies, lses = op.forward(logits, targets, entropy)
        ctx.save_for_backward(logits, targets, lses, entropies)
        ctx.op, ctx.entropy, ctx.inplace_grad = op, entropy, inplace_grad
        return logprobs, entropies

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropies):
        logits, targets, lses, entropies = ctx.saved_tensors
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lses)
        if not ctx.entropy or grad_entropies is None:
            grad_entropies = lses.new_zeros(0)
        grad = ctx.op.backward(logits, targets, lses, entropies, grad_logprobs.contiguous(),
                               grad_entropies.contiguous(), ctx.inplace_grad)
        return grad, None, None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, entropy: bool = False,
                   inplace_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets) [...] in fp32 from logits [..., V] (any float dtype), and the entropy [...] when
    asked; differentiable. The kernel never holds more than a row of fp32 per thread. With
    `inplace_grad` the backward writes the logits' gradient over the logits themselves (for logits
    nothing else uses, e.g. a loss's LM-head output): no [T, V] buffer at all."""
    shape = targets.shape
    flat = logits.reshape(-1, logits.shape[-1])
    supported = flat.dtype in (torch.float32, torch.bfloat16) or (flat.dtype == torch.float16 and flat.is_cpu)
    op = kernel("logprobs", flat.device.type) if supported else None
    if op is None:
        return token_logprobs_reference(logits, targets, entropy)
    contiguous = flat.contiguous()
    logprobs, entropies = _FusedLogprobs.apply(contiguous, targets.reshape(-1).to(torch.int64).contiguous(),
                                               entropy, op, inplace_grad and contiguous.data_ptr() == flat.data_ptr())
    return logprobs.view(shape), (entropies.view(shape) if entropy else None)


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor,
                        entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(input_ids[:, t+1] | ...) from logits[:, t]: [batch, seq-1] in fp32, and the entropy per
    position when asked, by the fused log-probs kernel (no [batch, seq, vocab] fp32 log-softmax;
    `token_logprobs`). Training and ZeRO inference both score with it, so the same logits give the
    same log-probs bit for bit. Logits that require grad and are not a leaf (a loss's LM-head output,
    used once) get their gradient written over them."""
    # the last position predicts nothing: a dummy target there avoids copying logits[:, :-1]
    targets = torch.cat([input_ids[:, 1:], input_ids.new_zeros(input_ids.shape[0], 1)], dim=1)
    logprobs, entropies = token_logprobs(logits, targets.to(logits.device), entropy,
                                             inplace_grad=logits.requires_grad and not logits.is_leaf)
    return logprobs[:, :-1], (entropies[:, :-1] if entropy else None)


# -- report ----------------------------------------------------------------------------------------------


def op_report() -> list[dict]:
    """Every op and device: compatible here, built (in the JIT cache), loaded, and from where."""
    from torch.utils.cpp_extension import _get_build_directory

    from op_builder.builder import OPS

    rows = []
    for op, builders in OPS.items():
        for device_type, builder_cls in zip(("cpu", "cuda"), builders):
            builder = builder_cls()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compatible = builder.is_compatible()
            folder = _get_build_directory(builder.name, verbose=False)
            built = os.path.isfile(os.path.join(folder, f"{builder.name}.so"))
            module = kernel(op, device_type) if compatible else None
            error = _FAILED.get((op, device_type))
            if not compatible:
                error = "no CUDA device" if device_type == "cuda" and not torch.cuda.is_available() else \
                    "not compatible (see the build warning)"
            rows.append({"op": op, "device": device_type, "name": builder.name, "compatible": compatible,
                         "built": built, "loaded": module is not None,
                         "path": getattr(module, "__file__", None) or (folder if built else None),
                         "disabled": ops_disabled(), "error": error})
    return rows
