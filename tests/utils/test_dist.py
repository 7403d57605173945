from ds_realloc.utils.dist import _first_slurm_host, slurm_env, under_launcher


def test_first_slurm_host():
    assert _first_slurm_host("node[03-05,7],gpu1") == "node03"
    assert _first_slurm_host("gpu1,gpu2") == "gpu1"
    assert _first_slurm_host("single") == "single"


def test_slurm_env_inside_an_srun_step():
    env = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_STEP_NODELIST": "gpu[10-11]", "SLURM_JOB_ID": "12345"}
    assert slurm_env(env) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu10",
                              "MASTER_PORT": str(20000 + 12345 % 20000)}
    assert under_launcher(env)


def test_no_launcher_outside_srun_steps_and_without_rank_vars():
    assert slurm_env({"SLURM_PROCID": "0", "SLURM_JOB_ID": "1"}) == {}  # a batch script, not an srun step
    assert not under_launcher({"SLURM_PROCID": "0"})
    assert not under_launcher({})
    assert under_launcher({"RANK": "0"}) and under_launcher({"OMPI_COMM_WORLD_RANK": "1"})
