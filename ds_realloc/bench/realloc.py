"""ZeRO-3 -> any layout: our reallocation against DeepSpeed's own ways to get there.

`ds-realloc bench realloc`: our plan and DeepSpeed's hybrid-engine paths, same model, ranks and
destination layout, each in fresh processes of one run:
- `baseline` (gather all): `GatheredParameters` over the whole model, then slicing this rank's
  shards out of the full tensors; for a replica destination (tensor parallelism 1) the gathered
  parameters are the destination, used in place (no copy) - DeepSpeed's hybrid engine without TP;
- `deepspeed_tp_gather` (tensor-parallel destinations): DeepSpeed hybrid engine's TP path
  (`hybrid_engine.generate`, `inference_tp_size > 1`): gather `tp_gather_partition_size` layers at a
  time (its config default, 8), slice them into the shards, free them, next group; then the
  parameters outside the layers.
Prints the times, peak memory, bytes received, the lower bound (`layout.plan.lower_bound`, from the
two layouts alone) and the ratios against the strongest baseline.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from ds_realloc.bench import bench_main, headline
from ds_realloc.utils.config import invalid, option
from ds_realloc.utils.errors import ConfigError


@dataclass
class ReallocBenchConfig:
    model: str = option("llama-100m", "a preset (llama-100m, smollm2-135m-instruct, tiny-llama, ...) or HF folder")
    nprocs: int = option(2, "processes to start (gloo on CPU, NCCL on GPU)")
    src: str = option("zero3", "the source: ZeRO-3 partitions over src_mesh (zero3 or zero3:d<N>)")
    dst: str = option("t2", "the destination strategy on dst_mesh, e.g. t2, d2, d2t2, p2")
    src_mesh: str = option("", "ranks of the source, e.g. 0-1 ('' = all processes)")
    dst_mesh: str = option("", "ranks of the destination ('' = all processes)")
    dtype: Literal["fp32", "bf16"] = option("fp32", "parameter dtype")
    offload_param: bool = option(False, "keep the ZeRO-3 partitions on CPU (offload_param)")
    tp_gather_partition_size: int = option(8, "layers DeepSpeed's TP path gathers at a time (its hybrid_engine "
                                              "default)")
    repeat: int = option(3, "measured repetitions after one warm-up (time: median, memory: max)")
    timeout_s: float = option(900.0, "give up after this many seconds")

    def validate(self) -> None:
        if self.nprocs < 1 or self.repeat < 1:
            raise invalid("nprocs" if self.nprocs < 1 else "repeat", "must be at least 1")


BASELINES = {"baseline": "DeepSpeed hybrid engine, gather all: GatheredParameters(whole model), then slice "
                         "(replica destinations: the gathered parameters in place)",
             "deepspeed_tp_gather": "DeepSpeed hybrid engine TP path: tp_gather_partition_size layers gathered, "
                                    "sliced, freed at a time"}


def _meshes(cfg: ReallocBenchConfig):
    from ds_realloc.layout.mesh import DeviceMesh, parse_mesh

    everyone = DeviceMesh(tuple(range(cfg.nprocs)))
    src = parse_mesh(cfg.src_mesh, where="src_mesh") if cfg.src_mesh else everyone
    dst = parse_mesh(cfg.dst_mesh, where="dst_mesh") if cfg.dst_mesh else everyone
    for name, mesh in (("src_mesh", src), ("dst_mesh", dst)):
        if max(mesh.ranks) >= cfg.nprocs:
            raise ConfigError(f"{name}={mesh} does not fit in nprocs={cfg.nprocs}")
    return src, dst


def _plan(cfg: ReallocBenchConfig):
    from transformers import AutoConfig

    from ds_realloc.layout.layout import Layout
    from ds_realloc.layout.mesh import parse_strategy
    from ds_realloc.layout.model import model_spec
    from ds_realloc.layout.plan import ReallocPlan
    from ds_realloc.models.presets import resolve_model_path

    path = resolve_model_path(cfg.model, field="model")
    model = model_spec(AutoConfig.from_pretrained(path))
    src_mesh, dst_mesh = _meshes(cfg)
    src_strategy = parse_strategy(cfg.src, src_mesh.size, where="src")
    if not src_strategy.zero3:
        raise ConfigError(f"src={cfg.src}: the source is a DeepSpeed ZeRO-3 model (zero3 or zero3:d<N>)")
    src = Layout(model, src_mesh, src_strategy)
    dst = Layout(model, dst_mesh, parse_strategy(cfg.dst, dst_mesh.size, where="dst"))
    return path, model, ReallocPlan.build(model, src, dst)


def _slice_into(buffers: dict, layout, rank: int, full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shards of the whole parameters in `full` into its destination buffers."""
    from ds_realloc.comm.realloc import strided

    for spec in layout.buffers(rank):
        for member in spec.members:
            if member.param in full:
                source = full[member.param].data.view(-1)
                for run in member.runs:
                    strided(buffers[spec.name], run.local, run.local_stride, run.length, run.count).copy_(
                        strided(source, run.full, run.full_stride, run.length, run.count))


def _empty_buffers(layout, rank: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    return {spec.name: torch.zeros(spec.numel, dtype=dtype, device=device) for spec in layout.buffers(rank)} \
        if rank in layout.ranks else {}


def gather_then_slice(module, layout, rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """DeepSpeed hybrid engine's gather-all: every parameter of the ZeRO-3 model gathered on every
    rank, then this rank's shards cut out of the full tensors (the cross-check of our outputs too)."""
    import deepspeed

    params = dict(module.named_parameters())
    buffers = _empty_buffers(layout, rank, dtype, next(iter(params.values())).device)
    with deepspeed.zero.GatheredParameters(list(params.values())):
        _slice_into(buffers, layout, rank, params)
    return buffers


def gather_in_place(module) -> float:
    """A replica destination the DeepSpeed way: the whole model gathered, used where it lies."""
    import deepspeed

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return float(sum(p.data.view(-1)[0] for p in params))  # read every gathered tensor once


def tp_gather_groups(module, layout, rank: int, dtype: torch.dtype, group_size: int) -> dict[str, torch.Tensor]:
    """DeepSpeed hybrid engine's TP path: `group_size` layers gathered at a time, sliced into this
    rank's shards and released; then the parameters outside the layers (embeddings, norm, head)."""
    import re

    import deepspeed

    params = dict(module.named_parameters())
    layers: dict[int, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        match = re.search(r"\.(?:layers|h)\.(\d+)\.", name)
        (layers.setdefault(int(match.group(1)), {}) if match else others)[name] = param
    order = sorted(layers)
    groups = [{n: p for i in order[g:g + group_size] for n, p in layers[i].items()}
              for g in range(0, len(order), group_size)] + [others]
    buffers = _empty_buffers(layout, rank, dtype, next(iter(params.values())).device)
    for group in groups:
        with deepspeed.zero.GatheredParameters(list(group.values())):
            _slice_into(buffers, layout, rank, group)
    return buffers


def _measure(op, repeat: int) -> tuple[float, int, dict]:
    import torch.distributed as dist

    from ds_realloc.utils.memory import PeakMemory, return_freed_memory

    output = op()  # warm-up (and the output for the cross-check)
    times = []
    for _ in range(repeat):
        dist.barrier()
        start = time.perf_counter()
        result = op()
        dist.barrier()
        times.append(time.perf_counter() - start)
        del result
    return_freed_memory()  # one more call for the peak memory (sampling it would slow the timed calls)
    dist.barrier()
    with PeakMemory() as memory:
        result = op()
        dist.barrier()
        del result
    return statistics.median(times), memory.bytes, output


def _bench_rank(rank: int, world: int, cfg_dict: dict, variant: str) -> dict:
    import torch.distributed as dist

    from ds_realloc.comm.realloc import ReallocStats, reallocate, zero3_sources
    from ds_realloc.engine.config import EngineConfig, OptimConfig
    from ds_realloc.engine.ds_config import BatchGeometry, frozen_ds_config, torch_dtype, train_ds_config
    from ds_realloc.engine.factory import build_frozen_model
    from ds_realloc.utils.dist import comm_device, group_of

    cfg = ReallocBenchConfig(**cfg_dict)
    path, model, plan = _plan(cfg)
    src_ranks = plan.src.ranks
    engine_config = train_ds_config(EngineConfig(zero_stage=3, dtype=cfg.dtype, offload_param=cfg.offload_param),
                                    OptimConfig(), BatchGeometry(1, 1, len(src_ranks)), total_steps=1)
    frozen_config = frozen_ds_config(engine_config, offload=cfg.offload_param)
    dtype = torch_dtype(engine_config)
    frozen = None
    if rank in src_ranks:
        frozen = build_frozen_model(path, "lm", frozen_config, offload=False, dp_group=group_of(src_ranks))
    sources = zero3_sources(frozen.module) if frozen else {}
    stats = ReallocStats()
    replica = plan.dst.strategy.tp == 1 and not plan.dst.strategy.zero3
    if variant == "ours":
        def op():
            return reallocate(plan, sources, dtype, comm_device(), stats=ReallocStats())
        reallocate(plan, sources, dtype, comm_device(), stats=stats)
        received = stats.received_elements
    else:
        def op():
            if frozen is None:
                return {}
            if variant == "deepspeed_tp_gather":
                return tp_gather_groups(frozen.module, plan.dst, rank, dtype, cfg.tp_gather_partition_size)
            return gather_in_place(frozen.module) if replica else gather_then_slice(frozen.module, plan.dst, rank,
                                                                                    dtype)
        received = sum(b.numel * (len(src_ranks) - 1) for b in plan.src.buffers(rank)) if frozen else 0
    seconds, peak, output = _measure(op, cfg.repeat)
    element = torch.empty((), dtype=dtype).element_size()
    result = {"time_s": seconds, "peak_mem_bytes": peak, "recv_bytes": received * element}
    if variant in ("ours", "deepspeed_tp_gather") and rank in src_ranks and set(plan.dst.ranks) <= set(src_ranks):
        reference = gather_then_slice(frozen.module, plan.dst, rank, dtype)  # cross-check, not timed
        result["outputs_equal"] = all(torch.equal(output[name], reference[name]) for name in reference)
    dist.barrier()
    return result


def run_realloc_bench(cfg: ReallocBenchConfig) -> dict:
    """Measure ours and the baseline (each in fresh processes) and return the report."""
    from ds_realloc.layout.plan import lower_bound
    from ds_realloc.models.presets import resolve_model_path
    from ds_realloc.utils.spawn import run_ranks

    resolve_model_path(cfg.model, field="model")  # build the preset once, before the ranks start
    _, model, plan = _plan(cfg)
    if not set(plan.dst.ranks) <= set(plan.src.ranks):
        raise ConfigError("the baseline (GatheredParameters) needs the destination on the source's ranks")
    baselines = BASELINES if plan.dst.strategy.tp > 1 else {"baseline": BASELINES["baseline"]}
    runs = {variant: run_ranks(_bench_rank, cfg.nprocs, asdict(cfg), variant, timeout=cfg.timeout_s)
            for variant in ("ours", *baselines)}
    element = torch.empty((), dtype=torch.float32 if cfg.dtype == "fp32" else torch.bfloat16).element_size()
    lower = lower_bound(plan.src, plan.dst)
    report = {
        "model": cfg.model, "params": model.numel, "nprocs": cfg.nprocs, "dtype": cfg.dtype,
        "src": str(plan.src), "dst": str(plan.dst), "offload_param": cfg.offload_param,
        "lower_bound_bytes_per_rank": [lower.get(r, 0) * element for r in range(cfg.nprocs)],
    }
    for variant, results in runs.items():
        report[variant] = {
            "time_s": max(r["time_s"] for r in results),
            "peak_mem_bytes": max(r["peak_mem_bytes"] for r in results),
            "recv_bytes_per_rank": [r["recv_bytes"] for r in results],
        }
    report["speedup"] = report["baseline"]["time_s"] / report["ours"]["time_s"]
    report["mem_ratio"] = report["ours"]["peak_mem_bytes"] / max(report["baseline"]["peak_mem_bytes"], 1)
    report["recv_equals_lower_bound"] = (sum(report["ours"]["recv_bytes_per_rank"]) ==
                                         sum(report["lower_bound_bytes_per_rank"]))
    report["outputs_equal"] = all(r.get("outputs_equal", True) for rows in runs.values() for r in rows)
    report["baselines"] = baselines
    return {**report, **headline(report, ("ours",), tuple(baselines), "time_s", higher_is_better=False)}


def format_report(report: dict) -> str:
    mib = 2**20
    lines = [f"reallocation {report['src']} -> {report['dst']}, {report['model']} ({report['params'] / 1e6:.0f}M "
             f"params, {report['dtype']}), {report['nprocs']} processes"]
    for variant in ("ours", *report["baselines"]):
        r = report[variant]
        lines.append(f"  {variant:<9} {r['time_s'] * 1e3:9.1f} ms   peak {r['peak_mem_bytes'] / mib:8.1f} MiB   "
                     f"received {[round(b / mib, 1) for b in r['recv_bytes_per_rank']]} MiB")
    lines.append(f"  lower bound received {[round(b / mib, 1) for b in report['lower_bound_bytes_per_rank']]} MiB")
    lines.append(f"  vs the best baseline ({report['best_baseline']}): {report['speedup_vs_best']:.2f}x faster, "
                 f"memory ratio {report['mem_ratio_vs_best']:.2f}; outputs equal: {report['outputs_equal']}")
    return "\n".join(lines)


def main(args: list[str]) -> int:
    return bench_main(args, ReallocBenchConfig, run_realloc_bench, format_report)


CONFIG = ReallocBenchConfig
