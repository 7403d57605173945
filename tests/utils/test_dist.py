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


def test_slots_per_host_come_from_the_launcher_or_the_hostfile(tmp_path):
    import pytest

    from ds_realloc.utils.dist import slots_per_host
    from ds_realloc.utils.errors import ConfigError

    assert slots_per_host(8, environ={"RANK": "0", "LOCAL_WORLD_SIZE": "4"}) == [4, 4]  # torchrun
    assert slots_per_host(4, environ={"RANK": "0", "LOCAL_SIZE": "2"}) == [2, 2]  # deepspeed launcher
    assert slots_per_host(4, environ={"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}) == [4]
    assert slots_per_host(4, environ={"SLURM_PROCID": "0", "SLURM_NTASKS_PER_NODE": "2(x2)"}) == [2, 2]
    assert slots_per_host(2, environ={}) == [2]  # we launch the job ourselves: one host
    assert slots_per_host(4, environ={"RANK": "0"}) is None  # a launcher that says nothing
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two machines\nworker-0 slots=8\nworker-1 slots=4\n")
    assert slots_per_host(12, str(hostfile), environ={"RANK": "0"}) == [8, 4]
    hostfile.write_text("worker-0 slots=8\nworker-1 gpus=4\n")
    with pytest.raises(ConfigError, match=r"hostfile:2: expected '<hostname> slots=<processes>'"):
        slots_per_host(12, str(hostfile))


def _gather_on_a_subgroup_then_shut_down(rank: int, world: int) -> tuple:
    import torch.distributed as dist

    from ds_realloc.utils import dist as ds_dist

    gathered = [None, None]
    if rank < 2:  # only the members make the group (local synchronisation)
        dist.all_gather_object(gathered, rank, group=ds_dist.group_of([1, 0]))
    cached = len(ds_dist._GROUPS)
    ds_dist.shutdown_distributed()
    ds_dist.shutdown_distributed()  # a second call (the spawn helper's own) is a no-op
    return gathered, cached, dist.is_initialized(), len(ds_dist._GROUPS)


def test_shutdown_destroys_every_process_group_after_the_last_collective():
    """A rank leaves with no process group alive (a gloo process that exits with its groups alive can
    abort at interpreter teardown), the groups it cached included."""
    from ds_realloc.utils.spawn import run_ranks

    world = 3  # [0, 1] is a proper subgroup, made with new_group
    results = run_ranks(_gather_on_a_subgroup_then_shut_down, world, timeout=120)
    assert results[0] == results[1] == ([0, 1], 1, False, 0)
    assert results[2] == ([None, None], 0, False, 0)
