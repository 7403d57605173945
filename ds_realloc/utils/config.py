"""Typed config trees: dataclasses with defaults and help, filled from YAML plus `key=value` overrides.

Every value is checked against its field's type when it enters; an error names the dotted field and
where the value came from (`file.yaml:12` or the command-line override), and an unknown field gets a
"did you mean" hint. A dataclass may define `validate()` and raise `invalid(field, message)` for
constraints between its own fields; the loader adds the path and the source location.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ds_realloc.utils.errors import ConfigError


def option(default: Any, help: str) -> Any:
    """A config field with a default and a one-line help text (shown by `--help`). A mutable default
    (a group of fields, a list, a dict) is deep-copied for every instance, nested groups included."""
    if dataclasses.is_dataclass(default) or isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


class FieldInvalid(Exception):
    """Raised by a config dataclass's `validate()`; the loader turns it into a located ConfigError."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def invalid(field: str, message: str) -> FieldInvalid:
    return FieldInvalid(field, message)


# ----------------------------------------------------------------------------------------------
# Reading YAML with line numbers


def _yaml_with_lines(path: Path) -> tuple[dict, dict[str, str]]:
    """Parse a YAML mapping; also return `dotted key -> "file:line"` for every key in it."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if node is None:
        return {}, {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}:{node.start_mark.line + 1}: the config file must be a mapping of fields")
    sources: dict[str, str] = {}

    def walk(n: yaml.Node, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = f"{prefix}{key_node.value}"
                sources[key] = f"{path}:{key_node.start_mark.line + 1}"
                walk(value_node, key + ".")

    walk(node, "")
    return yaml.safe_load(text) or {}, sources


def _set_dotted(data: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{'.'.join(parts[:i + 1])}' is a value, not a group of fields")
        node = child
    node[parts[-1]] = value


# ----------------------------------------------------------------------------------------------
# Type conversion

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        return f"dict[str, {_type_name(typing.get_args(tp)[1])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _convert(value: Any, tp: Any, key: str, sources: dict[str, str]) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp(), value, key + ".", sources)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("null", "none"))):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key, sources)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise _Mismatch
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        item = typing.get_args(tp)[0]
        converted = [_convert(v, item, f"{key}[{i}]", sources) for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise _Mismatch
        item = typing.get_args(tp)[1]
        return {str(k): _convert(v, item, f"{key}.{k}", sources) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise _Mismatch from None
            if number.is_integer():
                return int(number)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")


def _where(key: str, sources: dict[str, str]) -> str:
    while key:
        if key in sources:
            return sources[key] + ": "
        key = key.rpartition(".")[0]
    return ""


def _build(base: Any, data: Any, prefix: str, sources: dict[str, str]) -> Any:
    """The config group `base` with the fields `data` sets replaced. `base` is the group's default
    in its enclosing config (GRPO's own `algo` defaults, not PolicyConfig's), so a partial YAML or
    override changes only the fields it names."""
    cls, group = type(base), prefix.rstrip(".")
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(group, sources)}'{group}' must be a group of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in known:
            close = difflib.get_close_matches(str(name), list(known), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            fields_of = f"'{group}'" if group else "the config"
            raise ConfigError(f"{_where(key, sources)}unknown field '{key}'{hint}; {fields_of} has: {', '.join(known)}")
        try:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _build(getattr(base, name), value, key + ".", sources)
            else:
                kwargs[name] = _convert(value, hints[name], key, sources)
        except _Mismatch:
            raise ConfigError(
                f"{_where(key, sources)}{key}: expected {_type_name(hints[name])}, got {value!r}") from None
    obj = dataclasses.replace(base, **kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except FieldInvalid as e:
            key = f"{prefix}{e.field}"
            raise ConfigError(f"{_where(key, sources)}{key}: {e.message}") from None
    return obj


# ----------------------------------------------------------------------------------------------
# Public API


def load_config(cls: type, yaml_path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Any:
    """Build a `cls` config from its defaults, an optional YAML file, then `key=value` overrides."""
    data: dict = {}
    sources: dict[str, str] = {}
    if yaml_path is not None:
        data, sources = _yaml_with_lines(Path(yaml_path))
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ConfigError(f"command-line argument '{override}' is not of the form key=value")
        source = f"command-line override '{override}'"
        _set_dotted(data, key, value, source)
        sources[key] = source
    return _build(cls(), data, "", sources)


def describe(config: Any, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every leaf field of a config tree, in declaration order.
    The defaults are those of `config` itself (a class is built with no arguments first), so a
    command's own group defaults (GRPO's `algo`, PPO's `train.micro_batch_size`) show as they run."""
    instance = config() if isinstance(config, type) else config
    rows = []
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(value, f"{prefix}{f.name}."))
            continue
        rows.append((f"{prefix}{f.name}", _type_name(hints[f.name]), value, f.metadata.get("help", "")))
    return rows


def format_help(config: Any) -> str:
    """Every field of a config tree with its type, default and help, for `--help`."""
    lines = []
    for key, type_name, default, help_text in describe(config):
        lines.append(f"  {key} ({type_name}, default {default!r})")
        if help_text:
            lines.append(f"      {help_text}")
    return "\n".join(lines)


def to_dict(config: Any) -> dict:
    """A plain dict of a config tree (for config.yaml in the run folder and for logs)."""
    return dataclasses.asdict(config)
