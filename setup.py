"""Install ds_realloc: `pip install -e .` (tests: `pip install -e '.[test]'`, GPU extras: `.[gpu]`)."""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

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
        "test": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100"],
        "gpu": ["flash-attn>=2.5"],
    },
    entry_points={"console_scripts": ["ds-realloc=ds_realloc.cli:main"]},
)
