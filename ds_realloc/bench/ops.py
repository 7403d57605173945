"""The op_builder kernels against their torch references, in one process.

`ds-realloc bench ops`: `interval_copy` gathers `intervals` intervals of a flat fp32 tensor (the
reference: `torch.cat` of the slices); `gae` runs packed GAE over `sequences` sequences (the
references: a Python loop over tokens, and the vectorised torch scan, the best torch version we
have); `logprobs` takes log-probs of the chosen tokens from `[tokens, vocab]` logits, forward and
backward, as the loss paths do (the gradient written over the logits; the reference:
`log_softmax(logits.float()).gather(...)`), in bf16 (the training dtype) and fp32. Times are the best of `repeat`; peak memory is the rise of the process RSS while the op
runs (large buffers are mmap'd, so freed memory leaves the RSS).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from ds_realloc.bench import bench_main
from ds_realloc.utils.config import option


@dataclass
class OpsBenchConfig:
    intervals: int = option(10000, "intervals of the interval copy")
    interval_len: int = option(64, "elements per interval")
    sequences: int = option(512, "sequences of the packed GAE batch")
    max_len: int = option(256, "longest sequence (lengths vary from 1)")
    tokens: int = option(4096, "rows of the log-probs logits")
    vocab: int = option(49152, "vocabulary of the log-probs logits (SmolLM2's)")
    repeat: int = option(3, "runs per measurement (the best counts)")


def _best(fn: Callable[[object], object], repeat: int, setup: Callable[[], object] = lambda: None) -> float:
    best = float("inf")
    for _ in range(repeat):
        argument = setup()  # outside the timing
        start = time.perf_counter()
        fn(argument)
        best = min(best, time.perf_counter() - start)
    return best


def _peak(fn: Callable[[object], object], setup: Callable[[], object] = lambda: None) -> int:
    from ds_realloc.utils.memory import PeakMemory, return_freed_memory

    argument = setup()
    return_freed_memory()
    with PeakMemory() as memory:
        fn(argument)
    return memory.bytes


def _row(ours: Callable, reference: Callable, repeat: int, setup: Callable[[], object] = lambda: None,
         **extra) -> dict:
    ours_s, reference_s = _best(ours, repeat, setup), _best(reference, repeat, setup)
    ours_peak, reference_peak = _peak(ours, setup), _peak(reference, setup)
    return {"ours_s": ours_s, "reference_s": reference_s, "speedup": reference_s / ours_s,
            "ours_peak_bytes": ours_peak, "reference_peak_bytes": reference_peak,
            "mem_ratio": ours_peak / max(reference_peak, 1), **extra}


def _interval_rows(ours: Callable, baselines: dict[str, Callable], repeat: int, **extra) -> dict:
    """`ours` against every torch way of the same move; the headline ratio is against the fastest."""
    times = {name: _best(fn, repeat) for name, fn in baselines.items()}
    peaks = {name: _peak(fn) for name, fn in baselines.items()}
    best = min(times, key=times.get)
    ours_s, ours_peak = _best(ours, repeat), _peak(ours)
    return {"ours_s": ours_s, "baselines_s": times, "best_baseline": best, "reference_s": times[best],
            "speedup": times[best] / ours_s, "speedup_vs_best": times[best] / ours_s, "ours_peak_bytes": ours_peak,
            "reference_peak_bytes": peaks[best], "mem_ratio": ours_peak / max(peaks[best], 1),
            "mem_ratio_vs_best": ours_peak / max(peaks[best], 1), **extra}


def _interval_copy(cfg: OpsBenchConfig, regular: bool) -> dict:
    """Gathering `intervals` spans of a flat fp32 tensor into one buffer. Regular: equal spans a
    fixed stride apart (a dim-1 tensor-parallel shard: what reallocation moves; torch does it with
    one strided copy per piece). Irregular: spans of random lengths and gaps (torch's best: an
    `index_select` with the element index cached, or a copy per span)."""
    from ds_realloc import ops
    from ds_realloc.comm.realloc import strided

    generator = torch.Generator().manual_seed(0)
    if regular:
        lengths = torch.full((cfg.intervals,), cfg.interval_len)
        starts = torch.arange(cfg.intervals) * cfg.interval_len * 2
    else:
        lengths = torch.randint(1, 2 * cfg.interval_len, (cfg.intervals,), generator=generator)
        gaps = torch.randint(0, 2 * cfg.interval_len, (cfg.intervals,), generator=generator)
        starts = torch.cumsum(lengths + gaps, 0) - lengths
    flat = torch.randn(int((starts + lengths).max()), generator=generator)
    out = torch.empty(int(lengths.sum()))
    index = torch.cat([torch.arange(s, s + n) for s, n in zip(starts.tolist(), lengths.tolist())])  # cached
    expected = flat[index]
    assert torch.equal(ops.interval_gather(flat, starts, lengths, out), expected)
    bounds = list(zip(starts.tolist(), lengths.tolist()))

    def copy_per_span(_):
        return torch.cat([flat[a:a + b] for a, b in bounds], out=out)

    baselines = {"index_select_cached_index": lambda _: torch.index_select(flat, 0, index, out=out),
                 "copy_per_span": copy_per_span}
    if regular:  # one piece: count spans of one length, one stride
        def strided_copy(_):
            out.view(cfg.intervals, cfg.interval_len).copy_(
                strided(flat, 0, cfg.interval_len * 2, cfg.interval_len, cfg.intervals))
            return out
        baselines["strided_copy_per_piece"] = strided_copy
    for name, fn in baselines.items():
        assert torch.equal(fn(None), expected), name
    return _interval_rows(lambda _: ops.interval_gather(flat, starts, lengths, out), baselines, cfg.repeat,
                          intervals=cfg.intervals, spans="regular" if regular else "irregular")


def _gae(cfg: OpsBenchConfig) -> dict:
    from ds_realloc import ops

    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, cfg.max_len + 1, (cfg.sequences,), generator=generator)
    n = int(lengths.sum())
    rewards, values = torch.randn(n, generator=generator), torch.randn(n + cfg.sequences, generator=generator)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    truncated = torch.rand(cfg.sequences, generator=generator) < 0.5
    args = (rewards, values, cu, truncated, 0.99, 0.95)
    for got, want in zip(ops.gae(*args), ops.gae_reference(*args)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    row = _row(lambda _: ops.gae(*args), lambda _: ops.gae_reference(*args), cfg.repeat, tokens=n)
    loop_s = _best(lambda _: ops.gae_loop(*args), 1)
    row.update(reference="vectorised torch scan", python_loop_s=loop_s, speedup_vs_loop=loop_s / row["ours_s"])
    return row


def _logprobs(cfg: OpsBenchConfig, dtype: torch.dtype) -> dict:
    from ds_realloc import ops

    generator = torch.Generator().manual_seed(2)
    logits = (torch.randn(cfg.tokens, cfg.vocab, generator=generator) * 2).to(dtype)
    targets = torch.randint(0, cfg.vocab, (cfg.tokens,), generator=generator)
    upstream = torch.randn(cfg.tokens, generator=generator)

    def fresh_logits():  # what a loss gets: an LM-head output that requires grad (made outside the timing)
        leaf = logits.clone().requires_grad_(True)
        return leaf, leaf.view_as(leaf)

    def run(fn):
        def forward_backward(inputs):
            leaf, x = inputs
            logprobs, _ = fn(x, targets)
            (logprobs * upstream).sum().backward()
            return logprobs.detach(), leaf.grad
        return forward_backward

    def ours(x, t):  # as the loss paths call it: the gradient is written over the logits
        return ops.token_logprobs(x, t, inplace_grad=True)

    (ours_lp, ours_grad), (ref_lp, ref_grad) = run(ours)(fresh_logits()), \
        run(ops.token_logprobs_reference)(fresh_logits())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours_lp, ref_lp, rtol=tol, atol=tol)
    torch.testing.assert_close(ours_grad.float(), ref_grad.float(), rtol=tol, atol=tol)
    del ours_grad, ref_grad
    return _row(run(ours), run(ops.token_logprobs_reference), cfg.repeat, fresh_logits,
                shape=[cfg.tokens, cfg.vocab], dtype=str(dtype).removeprefix("torch."), measures="forward+backward")


def run_ops_bench(cfg: OpsBenchConfig) -> dict:
    from ds_realloc import ops

    report = {"threads": torch.get_num_threads(),
              "kernels": {r["op"]: r["loaded"] for r in ops.op_report() if r["device"] == "cpu"}}
    report["interval_copy"] = _interval_copy(cfg, regular=True)
    report["interval_copy_irregular"] = _interval_copy(cfg, regular=False)
    report["gae"] = _gae(cfg)
    report["logprobs"] = _logprobs(cfg, torch.bfloat16)
    report["logprobs_fp32"] = _logprobs(cfg, torch.float32)
    return report


def format_report(report: dict) -> str:
    lines = [f"op_builder kernels vs torch, {report['threads']} threads, loaded: {report['kernels']}"]
    for name in ("interval_copy", "interval_copy_irregular", "gae", "logprobs", "logprobs_fp32"):
        r = report[name]
        lines.append(f"  {name:<14} ours {r['ours_s'] * 1e3:9.2f} ms  torch {r['reference_s'] * 1e3:9.2f} ms  "
                     f"speedup {r['speedup']:6.2f}x  peak {r['ours_peak_bytes'] / 2**20:8.1f} / "
                     f"{r['reference_peak_bytes'] / 2**20:8.1f} MiB ({r['mem_ratio']:.2f})")
    lines.append(f"  gae vs a Python loop over tokens: {report['gae']['speedup_vs_loop']:.1f}x")
    return "\n".join(lines)


def main(args: list[str]) -> int:
    return bench_main(args, OpsBenchConfig, run_ops_bench, format_report)


CONFIG = OpsBenchConfig
