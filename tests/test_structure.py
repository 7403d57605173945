"""How the package is put together: no import cycles, no probing of configs or interfaces in the
runner, no DeepSpeed patched by an import, no mutable defaults shared between configs."""

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "ds_realloc"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at module level or inside functions alike."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "ds_realloc.dataflow.rlhf" in graph["ds_realloc.dataflow.catalog"]  # the walk sees real edges
    assert cycles(graph) == []


def test_a_cycle_is_found_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_runner_never_probes_configs_or_interfaces():
    probe = re.compile(r"getattr\((self\.)?cfg\b|getattr\(getattr\(|hasattr\(")
    hits = [f"{path.name}:{i}: {line.strip()}" for path in sorted((PACKAGE / "dataflow").glob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1) if probe.search(line)]
    assert hits == []


def test_the_runner_reads_top_down_in_under_300_lines():
    assert len((PACKAGE / "dataflow" / "runner.py").read_text().splitlines()) <= 300


def test_importing_the_package_patches_nothing_in_deepspeed():
    """Every module imported in a fresh interpreter: the DeepSpeed names ds_realloc may replace are
    still DeepSpeed's own (patches happen only when an engine is built: engine.deepspeed_compat)."""
    modules = sorted(name for name in _modules() if not name.endswith("__main__"))
    script = f"""
import importlib
from deepspeed import comm
from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator
from deepspeed.utils import groups
before = (comm.barrier, coordinator.assert_ints_same_as_other_ranks, groups.mpu)
for name in {modules!r}:
    importlib.import_module(name)
after = (comm.barrier, coordinator.assert_ints_same_as_other_ranks, groups.mpu)
assert all(a is b for a, b in zip(before, after)), after
print("unpatched", len({modules!r}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "unpatched" in result.stdout, result.stderr[-3000:]


def _config_classes() -> list[type]:
    """The config trees with groups (the other commands' configs are flat scalars)."""
    from ds_realloc.dataflow.catalog import builtin_experiments

    return [e.config_cls for e in builtin_experiments().values()]


def _mutable_parts(value, path: str = "") -> dict[str, object]:
    """Every mutable object inside a config tree (groups, lists, dicts) by its dotted path."""
    parts = {}
    if dataclasses.is_dataclass(value):
        parts[path or "."] = value
        for f in dataclasses.fields(value):
            parts.update(_mutable_parts(getattr(value, f.name), f"{path}{f.name}."))
    elif isinstance(value, (list, dict, set)):
        parts[path] = value
        for key, item in (value.items() if isinstance(value, dict) else enumerate(value)):
            parts.update(_mutable_parts(item, f"{path}{key}."))
    return parts


@pytest.mark.parametrize("config_cls", _config_classes(), ids=lambda c: c.__name__)
def test_two_fresh_configs_share_no_mutable_default(config_cls):
    first, second = _mutable_parts(config_cls()), _mutable_parts(config_cls())
    assert len(first) > 1  # the tree has groups to compare
    shared = [path for path, part in first.items() if second.get(path) is part]
    assert shared == []
