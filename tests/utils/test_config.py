from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from ds_realloc.utils.config import format_help, invalid, load_config, option
from ds_realloc.utils.errors import ConfigError


@dataclass
class Inner:
    lr: float = option(1e-3, "learning rate")
    steps: int = option(10, "steps")
    mode: Literal["a", "b"] = option("a", "mode")
    name: str | None = option(None, "optional name")

    def validate(self) -> None:
        if self.steps < 0:
            raise invalid("steps", "must be >= 0")


@dataclass
class Outer:
    inner: Inner = option(Inner(), "inner group")
    flag: bool = option(False, "a flag")
    ranks: list[int] = option([0, 1], "ranks")
    table: dict[str, int] = option({}, "a mapping")


def test_defaults_and_independent_mutable_defaults():
    a, b = load_config(Outer), load_config(Outer)
    assert a.inner.lr == 1e-3 and a.flag is False and a.ranks == [0, 1]
    a.ranks.append(2)
    assert b.ranks == [0, 1]


def test_overrides_are_typed():
    cfg = load_config(Outer, None, ["inner.lr=1e-5", "inner.steps=3", "flag=true", "inner.mode=b",
                                    "inner.name=x", "ranks=0,2,4", "table={a: 1}"])
    assert cfg.inner.lr == 1e-5 and cfg.inner.steps == 3 and cfg.flag is True
    assert cfg.inner.mode == "b" and cfg.inner.name == "x" and cfg.ranks == [0, 2, 4] and cfg.table == {"a": 1}
    assert load_config(Outer, None, ["inner.name=null"]).inner.name is None


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  lr: 0.5\n  steps: 4\nflag: yes\n")
    cfg = load_config(Outer, path, ["inner.steps=7"])
    assert (cfg.inner.lr, cfg.inner.steps, cfg.flag) == (0.5, 7, True)


def test_unknown_field_names_file_line_and_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  lr: 0.5\n  stepz: 4\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: unknown field 'inner\.stepz' \(did you mean 'inner\.steps'\?\)"):
        load_config(Outer, path)


def test_type_error_names_override():
    with pytest.raises(ConfigError, match=r"override 'inner\.steps=many'.*inner\.steps: expected int, got 'many'"):
        load_config(Outer, None, ["inner.steps=many"])
    with pytest.raises(ConfigError, match=r"inner\.mode: expected a\|b, got 'c'"):
        load_config(Outer, None, ["inner.mode=c"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(Outer, None, ["inner.steps=1.5"])


def test_validate_error_is_located(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("flag: false\ninner:\n  steps: -1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: inner\.steps: must be >= 0"):
        load_config(Outer, path)


def test_group_given_a_value_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="'inner' must be a group of fields"):
        load_config(Outer, None, ["inner=3"])
    path = tmp_path / "bad.yaml"
    path.write_text("inner:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(Outer, None, ["flag"])


def test_help_lists_every_leaf_field():
    text = format_help(Outer)
    for key in ("inner.lr", "inner.steps", "inner.mode", "inner.name", "flag", "ranks", "table"):
        assert f"  {key} (" in text
    assert "learning rate" in text and "a|b" in text


def test_overriding_one_field_keeps_the_commands_own_group_defaults():
    from ds_realloc.dataflow.rlhf import GRPOConfig

    cfg = load_config(GRPOConfig, None, ["algo.kl_coef=0", "train.seed=3"])
    assert (cfg.algo.advantage, cfg.algo.kl_coef, cfg.algo.kl_estimator) == ("grpo", 0.0, "k3")
    assert (cfg.train.batch_size, cfg.train.max_steps, cfg.train.seed) == (4, 30, 3)
