"""Builders of ds_realloc's kernels, subclasses of DeepSpeed's `OpBuilder`.

Each op has a CPU builder (C++ with OpenMP, vectorised with ATen's `Vectorized`, which calls the
Sleef functions libtorch exports) and a CUDA builder (the kernels in `csrc/cuda/*.cu` plus a C++
binding). Names are unique to this project (`ds_realloc_*`), sources are absolute paths, and
`load()` JIT-builds into the torch extensions cache on first use (then loads in milliseconds).
`DS_BUILD_OPS=1` or `DS_BUILD_DS_REALLOC_<OP>=1` pre-build at install (`setup.py`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from deepspeed.ops.op_builder.builder import CUDAOpBuilder, OpBuilder

CSRC = Path(__file__).resolve().parent / "csrc"


# ATen's CPU capability -> the macros and target flags of ATen's own build of that capability (the
# `Vectorized<float>` of that width, whose `exp` is the Sleef exp libtorch exports)
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c", "-mbmi2"],
}


def vector_capability() -> str:
    """The vector unit the CPU kernels target: the one ATen dispatches to in this process (the widest
    this CPU has, or what `ATEN_CPU_CAPABILITY` caps it at), so a kernel and the torch ops around it
    round alike; "DEFAULT" (plain C++) when it is neither AVX512 nor AVX2."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in _CAPABILITY_FLAGS else "DEFAULT"


class CPUKernelBuilder(OpBuilder):
    """A CPU kernel: one C++ source in csrc/cpu."""

    SOURCE = ""

    def __init__(self):
        # one JIT build per capability: processes capped at different ones do not rebuild each other's
        super().__init__(name=f"{self.NAME}_{vector_capability().lower()}")

    def absolute_name(self) -> str:
        return f"op_builder.{self.NAME}_op"

    def sources(self) -> list[str]:
        return [str(CSRC / "cpu" / self.SOURCE)]

    def include_paths(self) -> list[str]:
        return []

    def cxx_args(self) -> list[str]:
        return ["-O3", "-std=c++17", "-Wno-reorder", "-fopenmp", *_CAPABILITY_FLAGS.get(vector_capability(), [])]

    def extra_ldflags(self) -> list[str]:
        return ["-fopenmp"]

    def builder(self):
        """The setuptools extension of a pre-build at install (`setup.py`)."""
        from torch.utils.cpp_extension import CppExtension

        return CppExtension(name=self.absolute_name(), sources=self.sources(),
                            extra_compile_args={"cxx": self.cxx_args()}, extra_link_args=self.extra_ldflags())

    def is_compatible(self, verbose: bool = False) -> bool:
        if not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")):
            self.warning(f"{self.NAME}: no C++ compiler found")
            return False
        return super().is_compatible(verbose)


class CUDAKernelBuilder(CUDAOpBuilder):
    """A CUDA kernel: csrc/cuda/<op>.cu (plain CUDA, no torch headers, declared in kernels.h) and its
    torch binding csrc/cuda/<op>_binding.cpp."""

    SOURCES: tuple[str, ...] = ()

    def __init__(self):
        super().__init__(name=self.NAME)

    def absolute_name(self) -> str:
        return f"op_builder.{self.NAME}_op"

    def sources(self) -> list[str]:
        return [str(CSRC / "cuda" / s) for s in self.SOURCES]

    def include_paths(self) -> list[str]:
        return [str(CSRC / "cuda")]

    def is_compatible(self, verbose: bool = False) -> bool:
        import torch

        if not torch.cuda.is_available():
            if verbose:
                self.warning(f"{self.NAME}: no CUDA device")
            return False
        if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
            self.warning(f"{self.NAME}: nvcc not found")
            return False
        return super().is_compatible(verbose)


class IntervalCopyBuilder(CPUKernelBuilder):
    BUILD_VAR = "DS_BUILD_DS_REALLOC_INTERVAL_COPY"
    NAME = "ds_realloc_interval_copy"
    SOURCE = "interval_copy.cpp"


class GAEBuilder(CPUKernelBuilder):
    BUILD_VAR = "DS_BUILD_DS_REALLOC_GAE"
    NAME = "ds_realloc_gae"
    SOURCE = "gae.cpp"


class LogprobsBuilder(CPUKernelBuilder):
    BUILD_VAR = "DS_BUILD_DS_REALLOC_LOGPROBS"
    NAME = "ds_realloc_logprobs"
    SOURCE = "logprobs.cpp"


class IntervalCopyCUDABuilder(CUDAKernelBuilder):
    BUILD_VAR = "DS_BUILD_DS_REALLOC_INTERVAL_COPY_CUDA"
    NAME = "ds_realloc_interval_copy_cuda"
    SOURCES = ("interval_copy.cu", "interval_copy_binding.cpp")


class GAECUDABuilder(CUDAKernelBuilder):
    BUILD_VAR = "DS_BUILD_DS_REALLOC_GAE_CUDA"
    NAME = "ds_realloc_gae_cuda"
    SOURCES = ("gae.cu", "gae_binding.cpp")


class LogprobsCUDABuilder(CUDAKernelBuilder):
    BUILD_VAR = "DS_BUILD_DS_REALLOC_LOGPROBS_CUDA"
    NAME = "ds_realloc_logprobs_cuda"
    SOURCES = ("logprobs.cu", "logprobs_binding.cpp")


# op -> (CPU builder, CUDA builder)
OPS: dict[str, tuple[type[CPUKernelBuilder], type[CUDAKernelBuilder]]] = {
    "interval_copy": (IntervalCopyBuilder, IntervalCopyCUDABuilder),
    "gae": (GAEBuilder, GAECUDABuilder),
    "logprobs": (LogprobsBuilder, LogprobsCUDABuilder),
}
