"""op_builder kernels against their torch references (random and edge cases), the fallback, and the
CUDA sources compiling with nvcc."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ds_realloc import ops

CUDA_SOURCES = Path(__file__).parents[1] / "op_builder" / "csrc" / "cuda"


@pytest.fixture(params=["kernel", "fallback"])
def mode(request, monkeypatch):
    """Every test runs with the kernels and with DS_REALLOC_DISABLE_OPS=1 (the torch references)."""
    if request.param == "fallback":
        monkeypatch.setenv("DS_REALLOC_DISABLE_OPS", "1")
    else:
        monkeypatch.delenv("DS_REALLOC_DISABLE_OPS", raising=False)
        for op in ("interval_copy", "gae", "logprobs"):
            assert ops.kernel(op) is not None, f"{op} did not build here: {ops._FAILED.get((op, 'cpu'))}"
    return request.param


def _intervals(numel: int, count: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, numel, (count,), generator=generator)
    lengths = torch.minimum(torch.randint(0, 40, (count,), generator=generator), numel - starts)
    lengths[::7] = 0  # empty intervals
    return starts, lengths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_interval_gather_and_scatter(mode, dtype):
    generator = torch.Generator().manual_seed(0)
    flat = (torch.randn(5000, generator=generator) * 100).to(dtype)
    starts, lengths = _intervals(flat.numel(), 300, generator)
    packed = ops.interval_gather(flat, starts, lengths)
    expected = torch.cat([flat[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist())])
    assert torch.equal(packed, expected)
    target = torch.zeros_like(flat)
    ops.interval_scatter(target, starts, lengths, packed)
    want = torch.zeros_like(flat)
    for s, n, piece in zip(starts.tolist(), lengths.tolist(), expected.split(lengths.tolist())):
        want[s:s + n] = piece
    assert torch.equal(target, want)
    empty = torch.zeros(0, dtype=torch.int64)
    assert ops.interval_gather(flat, empty, empty).numel() == 0


def test_interval_out_of_range_is_an_error(mode):
    flat = torch.zeros(10)
    if mode == "kernel":
        with pytest.raises(RuntimeError, match=r"interval 0 \[8, 12\) is outside the tensor of 10 elements"):
            ops.interval_gather(flat, torch.tensor([8]), torch.tensor([4]), torch.zeros(4))


def _packed_batch(lengths: list[int], truncated: list[bool], generator):
    n = sum(lengths)
    rewards = torch.randn(n, generator=generator, dtype=torch.float64)
    values = torch.randn(n + len(lengths), generator=generator, dtype=torch.float64)
    cu = torch.tensor([0, *lengths]).cumsum(0)
    return rewards, values, cu, torch.tensor(truncated)


@pytest.mark.parametrize("lengths, truncated", [
    ([5, 1, 3, 8], [False, True, False, True]),
    ([1, 1, 1], [True, True, True]),  # length-1 sequences, all truncated
    ([4, 6], [True, True]),
    ([7], [False]),
    ([], []),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gae_matches_the_loop(mode, lengths, truncated, dtype):
    rewards, values, cu, done = _packed_batch(lengths, truncated, torch.Generator().manual_seed(1))
    rewards, values = rewards.to(dtype), values.to(dtype)
    want_adv, want_ret = ops.gae_loop(rewards, values, cu, done, 0.99, 0.95)
    adv, ret = ops.gae(rewards, values, cu, done, 0.99, 0.95)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(adv, want_adv, rtol=tol, atol=tol)
    torch.testing.assert_close(ret, want_ret, rtol=tol, atol=tol)


def test_gae_on_many_random_sequences(mode):
    generator = torch.Generator().manual_seed(2)
    lengths = torch.randint(1, 60, (200,), generator=generator).tolist()
    truncated = (torch.rand(200, generator=generator) < 0.5).tolist()
    rewards, values, cu, done = _packed_batch(lengths, truncated, generator)
    for got, want in zip(ops.gae(rewards, values, cu, done, 1.0, 0.9), ops.gae_loop(rewards, values, cu, done, 1.0, 0.9)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("vocab", [1000, 49152 // 16 + 3])
def test_fused_logprobs_forward_and_backward(mode, dtype, tol, vocab):
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 37, vocab, generator=generator) * 3).to(dtype)
    targets = torch.randint(0, vocab, (2, 37), generator=generator)
    upstream = torch.randn(2, 37, generator=generator), torch.randn(2, 37, generator=generator)
    results = []
    for fn in (ops.token_logprobs, ops.token_logprobs_reference):
        x = logits.clone().requires_grad_(True)
        logprobs, entropy = fn(x, targets, entropy=True)
        ((logprobs * upstream[0]).sum() + (entropy * upstream[1]).sum()).backward()
        results.append((logprobs, entropy, x.grad.float()))
    for got, want in zip(*results):
        assert got.dtype == want.dtype or got.dtype == torch.float32
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    only_logprobs, none = ops.token_logprobs(logits, targets)
    assert none is None
    torch.testing.assert_close(only_logprobs, results[1][0], rtol=tol, atol=tol)


def test_disabled_ops_use_the_references(monkeypatch):
    monkeypatch.setenv("DS_REALLOC_DISABLE_OPS", "1")
    assert ops.kernel("gae") is None and ops.kernel("logprobs") is None
    report = ops.op_report()
    assert {(r["op"], r["device"]) for r in report} == {(o, d) for o in ("interval_copy", "gae", "logprobs")
                                                        for d in ("cpu", "cuda")}
    assert all(r["disabled"] and not r["loaded"] for r in report)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", ["interval_copy.cu", "gae.cu", "logprobs.cu"])
def test_cuda_sources_compile(source, tmp_path):
    result = subprocess.run(["nvcc", "-std=c++17", "-O3", "-c", str(CUDA_SOURCES / source), "-o",
                             str(tmp_path / "kernel.o")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "kernel.o").stat().st_size > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_kernels_match_the_cpu_references():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 5003, generator=generator)
    targets = torch.randint(0, 5003, (64,), generator=generator)
    got, _ = ops.token_logprobs(logits.cuda(), targets.cuda())
    want, _ = ops.token_logprobs_reference(logits, targets)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    rewards, values, cu, done = _packed_batch([5, 1, 9], [True, False, True], generator)
    for g, w in zip(ops.gae(rewards.float().cuda(), values.float().cuda(), cu.cuda(), done.cuda(), 0.99, 0.95),
                    ops.gae_loop(rewards.float(), values.float(), cu, done, 0.99, 0.95)):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-5)
    flat = torch.randn(1000, generator=generator)
    starts, lengths = _intervals(1000, 50, generator)
    assert torch.equal(ops.interval_gather(flat.cuda(), starts, lengths).cpu(), ops.interval_gather(flat, starts, lengths))


def test_no_kernel_is_built_when_disabled_in_a_fresh_process(tmp_path):
    env = {**os.environ, "DS_REALLOC_DISABLE_OPS": "1", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    code = ("import torch; from ds_realloc import ops; "
            "a, r = ops.gae(torch.ones(3), torch.zeros(4), torch.tensor([0, 3]), torch.tensor([False]), 1.0, 1.0); "
            "print(a.tolist())")
    result = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.strip() == "[3.0, 2.0, 1.0]", result.stderr[-2000:]
    assert not any(tmp_path.iterdir())  # nothing was compiled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_logprobs_gradient_written_over_the_logits(mode, dtype):
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(50, 777, generator=generator).to(dtype)
    targets = torch.randint(0, 777, (50,), generator=generator)
    grads = []
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_(True)
        lp, _ = ops.token_logprobs(leaf.view_as(leaf), targets, inplace_grad=inplace)
        lp.sum().backward()
        grads.append(leaf.grad.float())
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_ops_benchmark_measures_interval_copy_against_every_torch_way():
    from ds_realloc.bench.ops import OpsBenchConfig, run_ops_bench

    report = run_ops_bench(OpsBenchConfig(intervals=200, interval_len=8, sequences=8, max_len=16, tokens=16,
                                          vocab=64, repeat=1))
    regular, irregular = report["interval_copy"], report["interval_copy_irregular"]
    assert set(regular["baselines_s"]) == {"strided_copy_per_piece", "index_select_cached_index", "copy_per_span"}
    assert set(irregular["baselines_s"]) == {"index_select_cached_index", "copy_per_span"}
    for row in (regular, irregular):
        assert row["reference_s"] == min(row["baselines_s"].values()) == row["baselines_s"][row["best_baseline"]]
        assert row["speedup_vs_best"] == row["reference_s"] / row["ours_s"]


def test_a_stale_build_lock_is_removed_and_a_live_one_waited_for(tmp_path, monkeypatch):
    """A build killed midway leaves torch's lock file behind, on which torch would wait forever."""
    import threading
    import time

    lock = tmp_path / "lock"
    monkeypatch.setattr(ops, "_build_lock", lambda name: lock)
    lock.touch()
    old = time.time() - ops.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        ops.wait_for_build_lock("x")
    assert not lock.exists()
    lock.touch()  # another process is building: wait until it is done
    threading.Timer(0.3, lock.unlink).start()
    began = time.perf_counter()
    ops.wait_for_build_lock("x", poll_s=0.05)
    assert 0.25 < time.perf_counter() - began < 5 and not lock.exists()
