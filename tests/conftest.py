"""Every test process, and every process a test spawns, computes at one CPU vector width: ATen, MKL,
oneDNN and our CPU kernels (which follow ATen's capability) target AVX2 even on an AVX512 machine, so
the golden metrics of tests/cli/golden are the same numbers on any x86 machine with AVX2 (vector
width changes the rounding of softmax, silu and reductions). A value already set in the environment
wins."""

import os

for _name, _value in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_CBWR", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "AVX2")):
    os.environ.setdefault(_name, _value)
