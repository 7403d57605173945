"""The launchers users start jobs with each run a 2-process job on CPU (gloo)."""

import shutil
import sys
from pathlib import Path

from tests.cli.helpers import TINY_RUN, run_cli, summary

JOB = ["sft", *TINY_RUN, "train.max_steps=2", "data.eval="]
BIN = Path(sys.executable).parent


def _assert_ran(result, out):
    assert result.returncode == 0, result.stderr[-4000:]
    assert summary(out)["steps"] == 2


def test_deepspeed_launcher_with_hostfile_and_a_host_relative_mesh(tmp_path):
    """The mesh `node0:0-1` (slots 0-1 of the hostfile's first host) takes its slots from the launcher."""
    hostfile = Path(__file__).parents[2] / "training_scripts" / "hostfile.localhost"
    launcher = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
                "--master_port", "29671", "--module", "ds_realloc"]
    result = run_cli([*JOB, "allocations.actor_train.mesh=node0:0-1", f"output.dir={tmp_path / 'run'}"], tmp_path,
                     launcher=launcher, timeout=300)
    _assert_ran(result, tmp_path / "run")
    assert summary(tmp_path / "run")["allocations"]["actor_train"] == "zero3:d2@[0-1]"


def test_accelerate_launch_with_deepspeed_config(tmp_path):
    config = Path(__file__).parents[2] / "training_scripts" / "accelerate" / "cpu_2proc_zero3.yaml"
    launcher = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "--main_process_port", "29672",
                "-m", "ds_realloc"]
    result = run_cli([*JOB, f"output.dir={tmp_path / 'run'}"], tmp_path, launcher=launcher, timeout=300)
    _assert_ran(result, tmp_path / "run")
    assert "accelerate's DeepSpeed plugin" in result.stderr  # the plugin's config was read


def test_mpirun(tmp_path):
    mpirun = shutil.which("mpirun", path=str(BIN)) or shutil.which("mpirun")
    launcher = [mpirun, "-np", "2", "--oversubscribe", sys.executable, "-m", "ds_realloc"]
    result = run_cli([*JOB, f"output.dir={tmp_path / 'run'}"], tmp_path, launcher=launcher, timeout=300,
                     env={"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    _assert_ran(result, tmp_path / "run")
