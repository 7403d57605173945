"""The part of `ds-realloc profile` that times a model's calls (planner/calibrated.py says how they are used).

Every rank of the profile job builds the same random copies of the model with 1 and 4 transformer
layers (its config otherwise), and all ranks time the same operation at the same moment, so the
memory bandwidth and caches they share are shared as in a run:
- generation (our inference layouts `d<world>` and `t<world>`): sampled tokens, no early stop, at
  each row count and two generation lengths (a decode step is the difference of the lengths);
- an inference forward over whole sequences (log-probs or values) on the same layouts;
- DeepSpeed engines per ZeRO stage on a group of one rank each, and with more than one rank also
  data-parallel over all of them (their collectives timed with them; other data-parallel sizes add
  the link model's collectives to the one-rank times), ZeRO 1, 2 and 3: an accumulating micro-batch's
  forward and backward (the policy's log-probs or the critic's values, as the training calls compute
  them), what the step's last micro-batch and the optimizer step add once per step, a no-grad
  forward; and on one rank the memory a steady training step holds above the level before it.
Each rank sets up its process as the runner does (on CPU, freed memory returned to the system at
once, which makes every large tensor a fresh mapping: an HF forward of SmolLM2 on [8, 54] tokens
takes 0.33 s so against 0.23 s without). Nothing here runs an experiment, so no run the planner
is judged on calibrates it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

LAYERS = (1, 4)  # far apart: the per-layer part is extrapolated to the real depth
# a new engine's first two optimizer steps are not timed: the first makes Adam's states, and the first
# micro-batch after it is slow too (1.9 s against 1.0-1.2 s after, SmolLM2 at ZeRO-2 on this CPU); a
# 4-layer copy on 2 ranks at ZeRO-3 took 1.1-1.7 s for its first micro-batches and 0.4-0.6 s after
ENGINE_WARMUP_STEPS = 2


@contextlib.contextmanager
def _without_gc():
    """Python's garbage collector run first and kept off inside (around a measurement's repeats), as
    `timeit` times: a collection inside a timed call made one of three repeats of a 4-layer copy's
    micro-batch 3.5x the others (0.66 s against 0.18 s) at the same repeat in every profile, and the
    30-layer extrapolation multiplied it."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def after_warmup(fn, warmups: int, repeats: int) -> list:
    """What the last `repeats` of `warmups + repeats` calls of `fn` return (the first ones run, untimed)."""
    for _ in range(warmups):
        fn()
    return [fn() for _ in range(repeats)]


def best_s(fn, repeats: int) -> float:
    """The fastest of `repeats` runs after a warm-up: for a device's peak rates (matmul, bandwidth)."""
    return min(times_s(fn, repeats))


def times_s(fn, repeats: int) -> list[float]:
    """The times of `repeats` calls after one warm-up call (first-call costs: allocator, plan building,
    thread pools)."""
    def timed() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    with _without_gc():
        return after_warmup(timed, 1, repeats)


def _synchronised_median_s(fn, repeats: int) -> float:
    """The median time of `fn` with every rank running it at once (the slowest rank's). A call's time,
    not a peak: ranks sharing a host slow each other down, and the fastest run is the one the other
    ranks happened to leave alone, so the median is what a run's calls (medians of steps) take."""
    import torch.distributed as dist

    def together():
        dist.barrier()
        fn()

    seconds = torch.tensor([statistics.median(times_s(together, repeats))], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return float(seconds)


def _models(model_path: Path, folder: Path, rank: int) -> dict[int, Path]:
    """Random-weight copies of the model with each of LAYERS layers, saved by rank 0."""
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ds_realloc.models.hf_io import save_hf_folder

    out = {}
    for layers in LAYERS:
        out[layers] = folder / f"layers{layers}"
        if rank == 0:
            config = AutoConfig.from_pretrained(model_path, num_hidden_layers=layers)
            torch.manual_seed(layers)
            save_hf_folder(AutoModelForCausalLM.from_config(config), AutoTokenizer.from_pretrained(model_path),
                           out[layers])
    dist.barrier()
    return out


def _batch(rows: int, prompt_len: int, new_tokens: int, vocab: int, seed: int):
    from ds_realloc.algorithms.rollout import Rollouts

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, prompt_len + new_tokens), generator=generator).tolist()
    return Rollouts.of([r[:prompt_len] for r in ids], [r[prompt_len:] for r in ids], 0)


def _inference_times(paths: dict[int, Path], world: int, cfg, dtype: str) -> dict[str, dict]:
    """{operation: {(layers, n): seconds}} of generation and inference forwards on d<world> and t<world>."""
    import torch.distributed as dist
    from transformers import AutoConfig

    from ds_realloc.engine.config import EngineConfig, OptimConfig
    from ds_realloc.engine.ds_config import BatchGeometry, frozen_ds_config, torch_dtype, train_ds_config
    from ds_realloc.engine.factory import build_frozen_model
    from ds_realloc.engine.hybrid import HybridEngine
    from ds_realloc.layout.mesh import DeviceMesh, Strategy
    from ds_realloc.models.generate import GenerationConfig, generate
    from ds_realloc.models.inference import InferenceCall
    from ds_realloc.utils.dist import group_of
    from ds_realloc.utils.errors import ConfigError

    rank = dist.get_rank()
    train = train_ds_config(EngineConfig(zero_stage=0, dtype=dtype), OptimConfig(), BatchGeometry(1, 1, 1), 1)
    frozen_config = frozen_ds_config(train, offload=False)
    mesh = DeviceMesh(tuple(range(world)))
    times: dict[str, dict] = {}
    for layers, path in paths.items():
        hf_config = AutoConfig.from_pretrained(path)
        for head in ("lm", "value"):
            frozen = build_frozen_model(path, head, frozen_config, offload=False, dp_group=group_of((rank,)))
            hybrid = HybridEngine(frozen.module, hf_config, head == "value", mesh, torch_dtype(train), zero3=False)
            for tp in sorted({1, world}):
                try:
                    layout = hybrid.layout(mesh, Strategy(dp=world // tp, tp=tp))
                    layout.buffers(0)
                except ConfigError:
                    continue  # the heads do not split over tp ranks
                with hybrid.placed(layout) as placement:
                    call = InferenceCall(placement.model)
                    for rows in cfg.rows:
                        batch = _batch(rows, cfg.prompt_len, cfg.new_tokens, hf_config.vocab_size, rows)
                        tokens = rows * (cfg.prompt_len + cfg.new_tokens)
                        with torch.no_grad():
                            if head == "value":
                                seconds = _synchronised_median_s(
                                    lambda: call.values(batch.input_ids, batch.attention_mask), cfg.repeats)
                                times.setdefault(f"score_value_t{tp}", {})[(layers, tokens)] = seconds
                                continue
                            seconds = _synchronised_median_s(lambda: call.logprobs(
                                batch.input_ids, batch.attention_mask, cfg.new_tokens), cfg.repeats)
                            times.setdefault(f"score_lm_t{tp}", {})[(layers, tokens)] = seconds
                            prompts = [row[:cfg.prompt_len] for row in batch.input_ids.tolist()]
                            lengths = {}
                            for new in (2, cfg.new_tokens):
                                sampling = GenerationConfig(max_new_tokens=new, min_new_tokens=new, seed=rows)
                                lengths[new] = _synchronised_median_s(
                                    lambda: generate(placement.model, prompts, sampling, (), 0), cfg.repeats)
                        decode = (lengths[cfg.new_tokens] - lengths[2]) / (cfg.new_tokens - 2)
                        times.setdefault(f"decode_t{tp}", {})[(layers, rows)] = decode
                        times.setdefault(f"prefill_t{tp}", {})[(layers, rows * cfg.prompt_len)] = lengths[2] - decode
            hybrid.release()
    return times


def _engine_times(paths: dict[int, Path], cfg, dtype: str) -> dict[str, dict]:
    """{operation: {(layers, tokens): seconds}} of DeepSpeed engines on a group of this rank alone, and
    `memory_<head>_z<stage>`: {(layers, tokens): bytes} a steady optimizer step of two micro-batches holds
    above the level before it (activations, logits, gathered layers, temporaries; what persists after the
    first step, Adam's moments and the touched gradient bucket, is not in it). Each timed step is an
    accumulating micro-batch (`train_...`: forward, backward) and the boundary one; what the boundary one
    takes beyond the other (the gradients' reduction into the optimizer's partitions, the optimizer step)
    is `optimizer_...`, paid once per step: a run's step of many micro-batches pays it once, not at each
    (on SmolLM2 on this CPU it is about 1 s a step at ZeRO-1 and 2, against 0.8-1.0 s for a one-row
    micro-batch). With more than one rank, also the engines data-parallel over all ranks
    (`..._d<world>`, `tokens` per rank): their ZeRO collectives (a layer's gather, the gradients'
    reduce-scatter, the updated weights' gather) are timed with their compute, as the runs issue them,
    not priced one message per collective."""
    import torch.distributed as dist

    from ds_realloc.algorithms.policy import critic_values, policy_logprobs
    from ds_realloc.engine.config import EngineConfig, OptimConfig
    from ds_realloc.engine.ds_config import BatchGeometry, train_ds_config
    from ds_realloc.engine.factory import build_train_engine
    from ds_realloc.utils.dist import group_of
    from ds_realloc.utils.memory import peak_memory, reset_peak_memory

    rank, world = dist.get_rank(), dist.get_world_size()
    times: dict[str, dict] = {}
    for dp, stage, (layers, path), head in itertools.product(sorted({1, world}), cfg.stages, paths.items(),
                                                              ("lm", "value")):
        suffix = "" if dp == 1 else f"_d{dp}"
        engine_cfg = EngineConfig(zero_stage=stage, dtype=dtype)
        micro = max(cfg.rows)
        ds_config = train_ds_config(engine_cfg, OptimConfig(), BatchGeometry(micro, 1, dp), 1)
        group = group_of((rank,) if dp == 1 else tuple(range(world)))
        engine = build_train_engine(path, head, ds_config, None, False, 0, group)
        forward = policy_logprobs if head == "lm" else critic_values
        for i, rows in enumerate(cfg.rows):
            batch = _batch(rows, cfg.prompt_len, cfg.new_tokens, engine.module.config.vocab_size, rows)
            tokens = rows * (cfg.prompt_len + cfg.new_tokens)

            def micro_batch(boundary: bool) -> float:
                """Forward, backward and `engine.step()`, as `train_micro_batches` runs every micro-batch."""
                engine.set_gradient_accumulation_boundary(boundary)
                start = time.perf_counter()
                out = forward(engine, batch)
                engine.backward((out[0] if head == "lm" else out).float().mean())
                engine.step()
                return time.perf_counter() - start

            def optimizer_step() -> tuple[float, float]:
                """An accumulating micro-batch, then the boundary one (its gradient reduction and the
                optimizer step), as a run's step of several micro-batches ends."""
                level = reset_peak_memory()
                timed = micro_batch(False), micro_batch(True)
                transient[0] = peak_memory() - level  # the last (steady) step's counts
                return timed

            def synchronised_step() -> tuple[float, float]:
                dist.barrier()
                return optimizer_step()

            transient = [0]
            with _without_gc():
                pairs = after_warmup(synchronised_step, ENGINE_WARMUP_STEPS if i == 0 else 1, cfg.repeats)
            inside = statistics.median(p[0] for p in pairs)
            times.setdefault(f"train_{head}_z{stage}{suffix}", {})[(layers, tokens)] = inside
            times.setdefault(f"optimizer_{head}_z{stage}{suffix}", {})[(layers, tokens)] = \
                statistics.median(p[1] for p in pairs) - inside
            if dp == 1:  # the memory model adds a data-parallel engine's partitions itself
                times.setdefault(f"memory_{head}_z{stage}", {})[(layers, tokens)] = float(transient[0])

            def no_grad_forward():
                with torch.no_grad():
                    forward(engine, batch)

            times.setdefault(f"engine_score_{head}_z{stage}{suffix}", {})[(layers, tokens)] = \
                _synchronised_median_s(no_grad_forward, cfg.repeats)
        engine.destroy()
    for kind in [k for k in times if k.startswith(("train_", "optimizer_", "memory_"))]:  # the slowest rank's
        keys = sorted(times[kind])
        values = torch.tensor([times[kind][k] for k in keys], dtype=torch.float64)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        times[kind] = dict(zip(keys, values.tolist()))
    return times


def _same_layers(times: dict) -> list[list[str]]:
    """The operations whose per-layer part is one cost: an operation under the LM head and under the value
    head (`train_lm_z2` and `train_value_z2`) run the same layers; memory keeps one fit per head (its
    figures are exact, not noisy, and a head's logits change what is alive at the peak)."""
    groups: dict[str, list[str]] = {}
    for key in sorted(times):
        pooled = not key.startswith("memory_")
        groups.setdefault(key.replace("_lm_", "_<head>_").replace("_value_", "_<head>_") if pooled else key,
                          []).append(key)
    return list(groups.values())


def _model_rank(rank: int, world: int, model_path: str, cfg_dict: dict) -> dict | None:
    """One rank of the model timing; rank 0 returns the fitted table as JSON."""
    import torch.distributed as dist
    from transformers import AutoConfig

    from ds_realloc.engine.ds_config import auto_dtype
    from ds_realloc.planner.calibrated import ModelTable, shared_layer_fits, signature
    from ds_realloc.planner.cost import ModelShape
    from ds_realloc.planner.profile_config import ProfileConfig
    from ds_realloc.utils.dist import comm_device
    from ds_realloc.utils.memory import return_freed_memory

    cfg = ProfileConfig(**cfg_dict)
    dtype = auto_dtype() if cfg.dtype == "auto" else cfg.dtype
    if comm_device().type == "cpu":
        return_freed_memory()  # as the runner does on CPU: every large tensor a fresh mapping (slower, measured so)
    with tempfile.TemporaryDirectory() as tmp:
        shared = [tmp]
        dist.broadcast_object_list(shared, src=0)  # every rank reads rank 0's folders (one host)
        paths = _models(Path(model_path), Path(shared[0]), rank)
        times = {**_inference_times(paths, world, cfg, dtype), **_engine_times(paths, cfg, dtype)}
        dist.barrier()
    if rank:
        return None
    fits = {}
    for group in _same_layers(times):
        fits.update(shared_layer_fits({key: times[key] for key in group}))
    shape = ModelShape.of(AutoConfig.from_pretrained(model_path))
    return {signature(shape, dtype): ModelTable(dtype, fits).to_json()}


def measure_model(cfg, model_path: Path) -> dict:
    """The profile's `models` entry for the model at `model_path` (on `cfg.ranks` spawned ranks)."""
    from ds_realloc.utils.spawn import run_ranks

    return run_ranks(_model_rank, cfg.ranks, str(model_path), dataclasses.asdict(cfg), timeout=1800)[0]
