"""Every launch script in training_scripts/ is a valid command line for the world it declares:
its launcher is replaced by a stand-in that records the ds-realloc arguments, which are then
dry-run (`--dry-run`: config keys, allocations against the model's heads and the world, no processes)
on a weights-free model config (`llama-7b`)."""

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.helpers import run_main

SCRIPTS = sorted(p for p in (Path(__file__).parents[2] / "training_scripts").rglob("*")
                 if p.suffix in (".sh", ".sbatch"))
# Stands in for deepspeed / accelerate / srun / mpirun / ds-realloc: appends the arguments after
# `ds_realloc` (or all of them, for ds-realloc itself) to $RECORD as one JSON line.
STAND_IN = """#!{python}
import json, os, sys
args = sys.argv[1:]
if os.path.basename(sys.argv[0]) != "ds-realloc":
    args = args[next(i for i, a in enumerate(args) if a == "ds_realloc") + 1:]
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps(args) + "\\n")
"""


def _recorded_commands(script: Path, tmp_path: Path) -> list[list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("deepspeed", "accelerate", "srun", "mpirun", "ds-realloc"):
        path = bin_dir / name
        path.write_text(STAND_IN.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    record = tmp_path / f"{script.stem}.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record), "MODEL": "llama-7b",
           "MPI_HOSTFILE": "hostfile", "OUT": str(tmp_path / "out")}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in record.read_text().splitlines()]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_script_is_valid_for_the_world_it_declares(script, tmp_path, monkeypatch):
    declared = re.search(r"^# world: (\d+)$", script.read_text(), re.M)
    assert declared, f"{script} does not declare its world size ('# world: N')"
    commands = _recorded_commands(script, tmp_path)
    assert commands
    monkeypatch.setenv("WORLD_SIZE", declared.group(1))
    for args in commands:
        sft_output = "model.path=" + str(tmp_path / "out" / "sft" / "hf" / "actor")  # the demo's DPO reads its SFT
        args = ["model.path=llama-7b" if a == sft_output else a for a in args]
        result = run_main([*args, "--dry-run"])
        assert result.returncode == 0, (args, result.stderr)
        assert f"on {declared.group(1)} ranks" in result.stdout, result.stdout


def test_a_dry_run_names_what_the_world_cannot_take():
    result = run_main(["ppo", "model.path=llama-7b", "allocations.actor_gen.strategy=d4t3", "launch.nprocs=12",
                       "--dry-run"])
    assert result.returncode == 2 and "allocations.actor_gen" in result.stderr
    ok = run_main(["grpo", "model.path=llama-7b", "allocation=d2t4", "train.batch_size=8", "launch.nprocs=8",
                   "--dry-run"])
    assert ok.returncode == 0 and "actor_gen d2t4@[0-7]" in ok.stdout, ok.stderr
