"""Where a process sits in the job: torchrun's variables, slurm's one task per GPU, refused launches."""

import pytest

from megatron_moe.config import ConfigError
from megatron_moe.parallel.mesh import DEFAULT_MASTER_PORT, export_launch_environment, first_host, launch_environment

# What `srun` sets in task 3 of a 2-node x 4-task step (checked on slurm 22.05 for the variables read here).
SLURM_STEP = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "3",
              "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_JOB_NODELIST": "gpu[007-008]",
              "SLURM_STEP_NODELIST": "gpu[007-008]"}


def test_torchrun_variables_win():
    env = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", **SLURM_STEP, "SLURM_STEP_NUM_TASKS": "2"}
    launch = launch_environment(env)  # torchrun inside an srun step of one task per node
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("torchrun", 5, 16, 1)


def test_slurm_one_task_per_gpu():
    launch = launch_environment(SLURM_STEP)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("slurm", 3, 8, 3)
    assert (launch.master_addr, launch.master_port) == ("gpu007", DEFAULT_MASTER_PORT)
    launch = launch_environment({**SLURM_STEP, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4242"})
    assert (launch.master_addr, launch.master_port) == ("10.0.0.1", 4242)
    # an `srun -n 1` step inside a larger allocation is one process
    assert launch_environment({**SLURM_STEP, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}).world_size == 1


def test_export_writes_torchruns_variables_for_env_init():
    env = dict(SLURM_STEP)
    export_launch_environment(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu007", "MASTER_PORT": str(DEFAULT_MASTER_PORT)}
    assert launch_environment(env).launcher == "torchrun"  # idempotent: a second resolution agrees
    assert launch_environment(env).rank == 3


def test_single_process_without_a_launcher():
    assert launch_environment({}).world_size == 1
    assert launch_environment({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).launcher == "single"


@pytest.mark.parametrize("env, needle", [
    # `python pretrain_moe.py` in a batch script of 2 tasks (no srun): one process that would train alone
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n1"}, "slurm batch script"),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"}, "mpirun started 4"),
    ({"PMI_SIZE": "2", "PMI_RANK": "0"}, "PMI launcher"),
    ({"RANK": "0"}, "not WORLD_SIZE"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK = 2"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK"),
    ({**SLURM_STEP, "SLURM_PROCID": "8"}, "SLURM_PROCID = 8"),
])
def test_launches_that_would_start_one_rank_worlds_are_refused(env, needle):
    with pytest.raises(ConfigError, match=needle):
        launch_environment(env)


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("gpu[003-010,12],cpu1", "gpu003"), ("a,b[1-2]", "a"), ("rack[2-3]-n[07-09]", "rack2-n07"),
    ("n[5]", "n5"), ("", ""),
])
def test_first_host_of_a_slurm_host_list(nodelist, first):
    """As `scontrol show hostnames | head -1` (tests/scripts/test_slurm.py checks it against scontrol)."""
    assert first_host(nodelist) == first
