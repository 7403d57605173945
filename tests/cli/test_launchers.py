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


def _srun_port() -> tuple[int, int]:
    """A free port and a SLURM job id that maps to it (utils.dist.slurm_env: 20000 + id % 20000)."""
    from tests.distributed import free_port

    for _ in range(50):
        port = free_port()
        if 20000 <= port < 40000:
            return port, port - 20000 + 40000  # a job id like a real one, same port
    raise AssertionError("no free port in 20000-39999")


def test_srun_step_environment(tmp_path):
    """Two ranks with only the variables `srun` sets for a step (no launcher, no RANK / MASTER_*)."""
    import os
    import subprocess

    _, job_id = _srun_port()
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "PMI", "SLURM_"))}
    procs = []
    for rank in range(2):
        env = {**base, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2",
               "SLURM_STEP_NUM_TASKS": "2", "SLURM_NODELIST": "localhost", "SLURM_STEP_NODELIST": "localhost",
               "SLURM_JOB_ID": str(job_id), "SLURM_NTASKS_PER_NODE": "2", "OMP_NUM_THREADS": "1",
               "PYTHONWARNINGS": "ignore"}
        procs.append(subprocess.Popen([sys.executable, "-m", "ds_realloc", *JOB, f"output.dir={tmp_path / 'run'}"],
                                      cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    try:
        errors = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for e in errors]
    assert summary(tmp_path / "run")["steps"] == 2
    assert summary(tmp_path / "run")["allocations"]["actor_train"] == "zero3:d2@[0-1]"  # one job of 2 ranks
