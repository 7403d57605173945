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


# The real `accelerate config` wizard, answered as a DeepSpeed user would: its DeepSpeed questions
# come only on the GPU-type paths (multi-CPU never asks them), so the answers take "multi-GPU"; the
# file it writes (use_cpu false) launches on this CPU machine as written.
WIZARD = [
    (r"In which compute environment", ("menu", r"This machine")),
    (r"Which type of machine", ("menu", r"multi-GPU")),
    (r"How many different machines", "1"),
    (r"Should distributed operations be checked", "no"),
    (r"optimize your script with torch dynamo", "no"),
    (r"Do you want to use DeepSpeed\?", "yes"),
    (r"specify a json file to a DeepSpeed config", "no"),
    (r"ZeRO optimization stage", ("menu", r"^2$")),  # not ds-realloc's default (3): shows whose settings run
    (r"Where to offload optimizer states", ("menu", r"^none$")),
    (r"Where to offload parameters", ("menu", r"^none$")),
    (r"How many gradient accumulation steps", "1"),
    (r"Do you want to use gradient clipping", "no"),
    (r"save 16-bit model weights", "no"),
    (r"deepspeed\.zero\.Init", "no"),
    (r"Mixture-of-Experts", "no"),
    (r"How many GPU\(s\) should be used", "2"),
    (r"Do you wish to use mixed precision", ("menu", r"^no$")),
]


def _answer_wizard(hf_home: Path) -> Path:
    import re

    import pexpect

    child = pexpect.spawn(str(BIN / "accelerate"), ["config"], env={**__import__("os").environ, "HF_HOME": str(hf_home)},
                          encoding="utf-8", timeout=30, dimensions=(50, 200))
    questions = [q for q, _ in WIZARD]
    asked = []
    while (i := child.expect([*questions, pexpect.EOF])) < len(WIZARD):
        question, answer = WIZARD[i]
        asked.append(question)
        if isinstance(answer, str):
            child.sendline(answer)
            continue
        child.expect(r"\x1b\[\?25l")  # the menu has been drawn (the cursor hidden)
        shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", child.before)
        options = [line.strip() for line in shown.split("select a choice")[-1].splitlines()[1:] if line.strip()]
        cursor = next(k for k, option in enumerate(options) if option.startswith("➔"))  # the menu's default
        target = next(k for k, option in enumerate(options) if re.search(answer[1], option.lstrip("➔ ")))
        child.send(("\x1b[B" * (target - cursor) if target >= cursor else "\x1b[A" * (cursor - target)) + "\r")
    child.close()
    assert child.exitstatus == 0 and "Do you want to use DeepSpeed\\?" in asked, asked
    return hf_home / "accelerate" / "default_config.yaml"


def test_accelerate_config_wizard_then_launch_without_a_config_file(tmp_path):
    written = _answer_wizard(tmp_path / "hf")
    assert "distributed_type: DEEPSPEED" in written.read_text() and "zero_stage: 2" in written.read_text()
    launcher = [str(BIN / "accelerate"), "launch", "--main_process_port", "29673", "-m", "ds_realloc"]
    result = run_cli([*JOB, f"output.dir={tmp_path / 'run'}"], tmp_path, launcher=launcher, timeout=300,
                     env={"HF_HOME": str(tmp_path / "hf")})
    _assert_ran(result, tmp_path / "run")
    assert summary(tmp_path / "run")["allocations"]["actor_train"] == "zero2:d2@[0-1]"  # the wizard's stage
