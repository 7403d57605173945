"""`ds-realloc plan-stats`: the statistics of a reallocation plan for any model size and layouts,
computed without processes (plans are pure)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Literal

from ds_realloc.layout.layout import Layout
from ds_realloc.layout.mesh import DeviceMesh, parse_mesh, parse_strategy
from ds_realloc.layout.model import model_spec
from ds_realloc.layout.plan import ReallocPlan
from ds_realloc.utils.config import invalid, option
from ds_realloc.utils.errors import ConfigError

ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class PlanStatsConfig:
    model: str = option("llama-7b", "llama-7b, llama-13b, llama-34b, llama-70b, mixtral-8x7b, qwen3-30b-a3b, "
                                    "a preset, an HF folder or config.json")
    world: int = option(8, "ranks in the job")
    src: str = option("zero3", "source strategy on src_mesh (zero3, zero3:d<N>, d<dp>t<tp>p<pp>e<ep>)")
    dst: str = option("d4t2", "destination strategy on dst_mesh")
    src_mesh: str = option("", "source ranks, e.g. 0-7 or 0,2,4,6 ('' = all ranks)")
    dst_mesh: str = option("", "destination ranks ('' = all ranks)")
    dtype: Literal["bf16", "fp16", "fp32"] = option("bf16", "parameter dtype (bytes per element)")
    fused: bool = option(False, "destination with fused qkv / gate_up buffers")
    value_head: bool = option(False, "a critic / reward model (scalar head instead of the LM head)")

    def validate(self) -> None:
        if self.world < 1:
            raise invalid("world", "must be at least 1")


def plan_report(hf_config: Any, cfg: PlanStatsConfig) -> dict:
    """Plan statistics in bytes, with the time it took to build the plan."""
    model = model_spec(hf_config, value_head=cfg.value_head)
    everyone = DeviceMesh(tuple(range(cfg.world)))
    src_mesh = parse_mesh(cfg.src_mesh, where="src_mesh") if cfg.src_mesh else everyone
    dst_mesh = parse_mesh(cfg.dst_mesh, where="dst_mesh") if cfg.dst_mesh else everyone
    for name, mesh in (("src_mesh", src_mesh), ("dst_mesh", dst_mesh)):
        if max(mesh.ranks) >= cfg.world:
            raise ConfigError(f"{name}={mesh} does not fit in world={cfg.world}")
    src = Layout(model, src_mesh, parse_strategy(cfg.src, src_mesh.size, where="src"))
    dst = Layout(model, dst_mesh, parse_strategy(cfg.dst, dst_mesh.size, where="dst"), fused=cfg.fused)
    start = time.perf_counter()
    plan = ReallocPlan.build(model, src, dst)
    stats = plan.stats()
    elapsed = time.perf_counter() - start
    element = ELEMENT_BYTES[cfg.dtype]
    received = [stats.recv.get(r, 0) * element for r in plan.dst.ranks]
    report = {
        "model": cfg.model, "params": model.numel, "src": str(src), "dst": str(plan.dst), "dtype": cfg.dtype,
        "build_s": elapsed, "model_bytes": model.numel * element,
        "recv_bytes_min": min(received), "recv_bytes_mean": statistics.fmean(received),
        "recv_bytes_max": max(received),
        **stats.as_dict(element),
    }
    report["recv_equals_lower_bound"] = report["total_recv_bytes"] == report["total_lower_bound_bytes"]
    return report


def format_plan_report(report: dict) -> str:
    gib = 2**30
    return "\n".join([
        f"plan {report['src']} -> {report['dst']}: {report['model']} ({report['params'] / 1e9:.2f}B params, "
        f"{report['model_bytes'] / gib:.1f} GiB in {report['dtype']}), built in {report['build_s']:.2f} s",
        f"  received per destination rank: min {report['recv_bytes_min'] / gib:.3f}  mean "
        f"{report['recv_bytes_mean'] / gib:.3f}  max {report['recv_bytes_max'] / gib:.3f} GiB",
        f"  total received {report['total_recv_bytes'] / gib:.2f} GiB = lower bound "
        f"{report['total_lower_bound_bytes'] / gib:.2f} GiB: {report['recv_equals_lower_bound']}",
        f"  busiest rank {report['busiest_rank']} moves {report['busiest_rank_bytes'] / gib:.3f} GiB; "
        f"{report['messages']} rank pairs exchange data",
    ])
