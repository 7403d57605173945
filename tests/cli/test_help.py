"""`ds-realloc <command> --help` shows the defaults the command runs with."""

import re

import pytest

from ds_realloc.cli import distributed_commands, main
from ds_realloc.utils.config import load_config, to_dict

COMMANDS = distributed_commands()


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "allocations":
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_the_defaults_the_command_runs_with(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    shown = dict(re.findall(r"^  (\S+) \(.*, default (.*)\)$", capsys.readouterr().out, flags=re.M))
    actual = _leaves(to_dict(load_config(COMMANDS[command].config_cls)))
    assert set(shown) == set(actual)
    assert {key: shown[key] for key in actual} == {key: repr(value) for key, value in actual.items()}


def test_grpo_help_names_its_own_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["grpo", "--help"])
    text = capsys.readouterr().out
    for line in ("optim.lr (float, default 2e-05)", "train.batch_size (int, default 4)",
                 "rollout.samples_per_prompt (int, default 4)", "algo.advantage (gae|grpo|dr_grpo|rloo|remax, "
                                                               "default 'grpo')"):
        assert line in text
