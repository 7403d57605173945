"""Install ds_realloc: `pip install -e .` (tests: `pip install -e '.[test]'`, GPU extras: `.[gpu]`).

The op_builder kernels JIT-build on first use. To pre-build them at install (DeepSpeed's
convention): `DS_BUILD_OPS=1 pip install --no-build-isolation .`, or one op with
`DS_BUILD_DS_REALLOC_<OP>=1` (e.g. DS_BUILD_DS_REALLOC_LOGPROBS); incompatible ops are skipped.
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]



def _prebuilt_ops() -> dict:
    """setuptools extensions of the ops requested by DS_BUILD_OPS / DS_BUILD_DS_REALLOC_<OP>."""
    everything = os.environ.get("DS_BUILD_OPS", "0") == "1"
    if not everything and not any(k.startswith("DS_BUILD_DS_REALLOC_") for k in os.environ):
        return {}
    from torch.utils.cpp_extension import BuildExtension

    from op_builder.builder import OPS

    extensions = []
    for builders in OPS.values():
        for builder_cls in builders:
            builder = builder_cls()
            if os.environ.get(builder.BUILD_VAR, "1" if everything else "0") != "1":
                continue
            if builder.is_compatible():
                extensions.append(builder.builder())
            else:
                print(f"ds_realloc: skipping {builder.NAME}: not compatible with this machine")
    return {"ext_modules": extensions, "cmdclass": {"build_ext": BuildExtension}} if extensions else {}


setup(
    name="ds_realloc",
    version="0.1.0",
    description="RLHF on DeepSpeed ZeRO with parameter reallocation between per-call layouts",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ds_realloc", "ds_realloc.*", "op_builder", "op_builder.*"]),
    package_data={"op_builder": ["csrc/**/*"], "ds_realloc": ["configs/*.yaml"]},
    install_requires=requirements,
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "pexpect>=4.8"],
        "gpu": ["flash-attn>=2.5"],
    },
    entry_points={"console_scripts": ["ds-realloc=ds_realloc.cli:main"]},
    **_prebuilt_ops(),
)
