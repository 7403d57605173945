"""The same-host shared-memory all-reduce (comm.shm): where it is used, it gives gloo's bits."""

import dataclasses

import pytest
import torch

from tests.distributed import run_ranks


def _both_paths(rank, world):
    import os

    import torch.distributed as dist

    from ds_realloc.comm import shm
    from ds_realloc.models.generate import GenerationConfig, generate
    from ds_realloc.models.tp import TensorParallel, VocabShard, argmax
    from tests.models.test_inference import _tp_model

    fast = TensorParallel.of(world, rank, dist.group.WORLD)
    assert fast.shm, "LOCAL_SIZE is set by run_ranks, the op is built and the host has a core per rank"
    slow = dataclasses.replace(fast, shm=False)
    out = {"segments_left": [n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer")
                             and n.endswith(f"_{os.environ['MASTER_PORT']}_{rank}")]}  # unlinked at the start
    cores = os.cpu_count
    os.cpu_count = lambda: 1
    out["oversubscribed_keeps_gloo"] = not shm.available(world)  # the op's waits spin
    os.cpu_count = cores
    generator = torch.Generator().manual_seed(rank)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 70, generator=generator).to(dtype)
        for op in (dist.ReduceOp.SUM, dist.ReduceOp.MAX):
            a, b = fast.all_reduce(x.clone(), op), slow.all_reduce(x.clone(), op)
            out[f"{dtype}_{op}"] = (torch.equal(a, b), a)
        out[f"{dtype}_gather"] = torch.equal(fast.all_gather(x), slow.all_gather(x))
    ties = torch.full((2, 8), -1.0)
    ties[0, 3] = ties[0, 5] = 2.0  # the same maximum on both ranks, at different local ids
    ties[1, rank] = 1.0
    vocab = VocabShard.of(16, fast)
    out["argmax"] = (argmax(ties, vocab, fast).tolist(), argmax(ties, vocab, slow).tolist())
    with pytest.raises(TypeError):
        shm.all_reduce_sum_(torch.ones(2, dtype=torch.int64))  # the op would skip it silently
    _, config, model = _tp_model("tiny-llama", "t2", tuple(range(world)))
    prompts = [[5, 17, 99], [9, 8, 7, 6, 5, 4]]
    runs = []
    for tp in (fast, slow):
        model.tp = tp
        for sampling in ({"greedy": True}, {"temperature": 0.8, "top_k": 20, "seed": 3}):
            runs.append(generate(model, prompts, GenerationConfig(max_new_tokens=12, **sampling),
                                 [config.eos_token_id], config.pad_token_id))
    out["generate"] = all(torch.equal(f.tokens, s.tokens) and torch.equal(f.logprobs, s.logprobs)
                          for f, s in zip(runs[:2], runs[2:]))
    return out


def test_shared_memory_collectives_equal_gloo_bitwise():
    per_rank = run_ranks(_both_paths, 2)
    for out in per_rank:
        for key, value in out.items():
            if key == "argmax":
                assert value[0] == value[1] == [3, 0], value  # rank 0 holds ids 0-7: its first maximum wins
            elif key == "segments_left":
                assert value == [], value  # DeepSpeed leaves them behind: ~67 MB each, until the host runs out
            elif key in ("generate", "oversubscribed_keeps_gloo") or key.endswith("gather"):
                assert value, key
            else:
                assert value[0], key
    for key in per_rank[0]:
        if key.endswith(("SUM", "MAX")):
            assert torch.equal(per_rank[0][key][1], per_rank[1][key][1]), key  # the same bits on every rank

