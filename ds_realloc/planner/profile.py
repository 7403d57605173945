"""Device profiles: what one device and its links achieve, the only inputs of the cost model.

A profile is either measured on this machine (`ds-realloc profile` writes one as JSON) or built in
for a GPU the planner plans for without running on it. The built-in figures are the vendor's peak
numbers times an efficiency factor; each profile names both. Throughputs are achievable rates, in
FLOP/s and bytes/s; link figures are per rank for a ring collective (bus bandwidth) and per step.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ds_realloc.utils.errors import ConfigError

DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Link:
    """A collective path between ranks: bus bandwidth per rank (bytes/s) and latency per ring step (s)."""

    bandwidth: float
    latency: float


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    memory_bytes: int  # usable memory per device
    matmul_flops: Mapping[str, float]  # dense matmul FLOP/s per dtype (fp32, bf16, fp16)
    memory_bandwidth: float  # device memory bytes/s
    intra_node: Link  # between ranks of one node
    inter_node: Link  # between nodes
    host_bandwidth: float  # device <-> host bytes/s (ZeRO offload)
    host_adam_params_per_s: float  # parameters per second the CPU Adam updates (ZeRO-offload's optimizer)
    gpus_per_node: int
    source: str = ""  # where the figures come from
    # measured call times by model shape: signature -> a ModelTable's JSON (planner/calibrated.py)
    models: Mapping[str, Mapping] = field(default_factory=dict)

    def flops(self, dtype: str) -> float:
        if dtype not in self.matmul_flops:
            raise ConfigError(f"device profile '{self.name}' has no matmul throughput for dtype '{dtype}'; "
                              f"it has: {', '.join(sorted(self.matmul_flops))}")
        return self.matmul_flops[dtype]

    def link(self, ranks_per_node: int, ranks: int) -> Link:
        """The slowest link a collective over `ranks` ranks, `ranks_per_node` of them per node, crosses."""
        return self.intra_node if ranks <= ranks_per_node else self.inter_node

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _gpu(name: str, memory_gb: float, bf16_tflops: float, fp32_tflops: float, hbm_tb_s: float, nvlink_gb_s: float,
         network_gb_s: float, pcie_gb_s: float, source: str) -> DeviceProfile:
    """A GPU from its datasheet peaks: matmul at 60% of peak (large GEMMs reach 60-75%), memory at 80%,
    NVLink and the network at 80% of the per-direction peak (NCCL's bus bandwidth on large messages),
    PCIe at 80%; the host's Adam at 1e9 parameters/s (DeepSpeed's CPU Adam on a many-core host)."""
    return DeviceProfile(
        name=name, memory_bytes=int(memory_gb * 1e9),
        matmul_flops={"bf16": 0.6 * bf16_tflops * 1e12, "fp16": 0.6 * bf16_tflops * 1e12,
                      "fp32": 0.6 * fp32_tflops * 1e12},
        memory_bandwidth=0.8 * hbm_tb_s * 1e12,
        intra_node=Link(0.8 * nvlink_gb_s * 1e9, 10e-6), inter_node=Link(0.8 * network_gb_s * 1e9, 20e-6),
        host_bandwidth=0.8 * pcie_gb_s * 1e9, host_adam_params_per_s=1e9, gpus_per_node=8,
        source=source + "; efficiency: matmul 0.6, memory / links / PCIe 0.8 of peak")


# Peaks from NVIDIA's datasheets (dense, no sparsity): bf16 tensor cores, fp32 without TF32 (torch's default),
# HBM bandwidth, NVLink per direction (half the quoted bidirectional figure), one 400 Gb/s (NDR) or
# 200 Gb/s (HDR) InfiniBand NIC per GPU, PCIe Gen5 / Gen4 x16 per direction.
BUILTIN: dict[str, DeviceProfile] = {
    "h100": _gpu("h100", 80, 989.4, 67, 3.35, 450, 50, 64,
                 "NVIDIA H100 SXM5 datasheet: 989 TFLOPS BF16, 67 TFLOPS FP32, 3.35 TB/s HBM3, 80 GB, "
                 "NVLink 900 GB/s; NDR 400 Gb/s per GPU; PCIe Gen5"),
    "h200": _gpu("h200", 141, 989.4, 67, 4.8, 450, 50, 64,
                 "NVIDIA H200 SXM datasheet: 989 TFLOPS BF16, 67 TFLOPS FP32, 4.8 TB/s HBM3e, 141 GB, "
                 "NVLink 900 GB/s; NDR 400 Gb/s per GPU; PCIe Gen5"),
    "a100": _gpu("a100", 80, 312, 19.5, 2.039, 300, 25, 32,
                 "NVIDIA A100 SXM4 80GB datasheet: 312 TFLOPS BF16, 19.5 TFLOPS FP32, 2.04 TB/s HBM2e, 80 GB, "
                 "NVLink 600 GB/s; HDR 200 Gb/s per GPU; PCIe Gen4"),
}


def _from_json(data: dict, where: str) -> DeviceProfile:
    names = {f.name for f in dataclasses.fields(DeviceProfile)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field '{unknown[0]}' in a device profile; fields: {', '.join(sorted(names))}")
    required = [f.name for f in dataclasses.fields(DeviceProfile)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"{where}: device profile lacks field '{missing[0]}'")
    try:
        values = dict(data, intra_node=Link(**data["intra_node"]), inter_node=Link(**data["inter_node"]))
        profile = DeviceProfile(**values)
    except TypeError as e:
        raise ConfigError(f"{where}: a link needs 'bandwidth' and 'latency' ({e})") from None
    for dtype, rate in profile.matmul_flops.items():
        if dtype not in DTYPES or not rate > 0:
            raise ConfigError(f"{where}: field 'matmul_flops.{dtype}' must be a positive rate of one of {DTYPES}")
    for name in ("memory_bytes", "memory_bandwidth", "host_bandwidth", "host_adam_params_per_s", "gpus_per_node"):
        if not getattr(profile, name) > 0:
            raise ConfigError(f"{where}: field '{name}' must be positive, got {getattr(profile, name)!r}")
    for name in ("intra_node", "inter_node"):
        link = getattr(profile, name)
        if not link.bandwidth > 0 or link.latency < 0:
            raise ConfigError(f"{where}: field '{name}' needs a positive bandwidth and a latency >= 0")
    for key, table in profile.models.items():
        fits = table.get("fits") if isinstance(table, dict) else None
        if not isinstance(fits, dict) or "dtype" not in table:
            raise ConfigError(f"{where}: field 'models.{key}' must hold 'dtype' and 'fits' (operation -> "
                              f"{{'n': sizes, 'fixed': seconds, 'layer': seconds per layer}})")
        for op, fit in fits.items():
            if not _is_piecewise(fit):
                raise ConfigError(f"{where}: field 'models.{key}.fits.{op}' must hold 'n', 'fixed' and 'layer': "
                                  f"lists of one length (at least 2) of numbers, 'n' increasing")
    return profile


def _is_piecewise(fit) -> bool:
    if not isinstance(fit, dict) or set(fit) != {"n", "fixed", "layer"}:
        return False
    columns = [fit[k] for k in ("n", "fixed", "layer")]
    if any(not isinstance(c, list) or len(c) != len(fit["n"]) or
           not all(isinstance(v, (int, float)) for v in c) for c in columns):
        return False
    return len(fit["n"]) >= 2 and all(a < b for a, b in zip(fit["n"], fit["n"][1:]))


def load_profile(name_or_path: str) -> DeviceProfile:
    """A built-in profile by name (h100, h200, a100) or one a `ds-realloc profile` run wrote (JSON)."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"device '{name_or_path}' is neither a built-in profile ({', '.join(BUILTIN)}) "
                          f"nor a profile file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a device profile is a JSON object")
    return _from_json(data, str(path))
