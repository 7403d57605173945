"""The README stays true: its set-up commands are what CI runs, and its config table is complete."""

import re
from pathlib import Path

from ds_realloc.dataflow.catalog import builtin_experiments
from ds_realloc.utils.config import describe

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(python3 -m venv .*)\n```", README)
    assert len(commands) == 2 and commands[0].endswith("ds-realloc ppo") and commands[1].endswith("pytest")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_every_config_field_is_in_the_reference():
    for experiment in builtin_experiments().values():
        for key, *_ in describe(experiment.config_cls):
            assert f"`{key}`" in README, key
