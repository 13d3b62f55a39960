"""Where rank, world size and local rank come from: torchrun, mpirun/mpiexec, or Slurm's srun.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT itself. Under MPI (Open MPI,
MPICH/Hydra, Intel MPI, MVAPICH) or a bare ``srun`` the launcher's own variables are read and
translated, so clusters without torchrun work. The rendezvous address is MASTER_ADDR when set;
otherwise, under MPI with mpi4py installed, rank 0's host name is broadcast; otherwise localhost
(single node).

Under torchrun, a worker dies with its agent: torch elastic starts workers in their own sessions
and sets no PDEATHSIG, so a ``kill -9`` of torchrun used to leave them (and their checkpoint
helpers) running. ``detect()`` with the real environment binds the worker to its parent first.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

# (rank, world size, local rank) variable names per launcher, most specific first.
_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mvapich", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str  # torchrun | openmpi | mvapich | mpich | slurm | single
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def detect(environ=None) -> LaunchEnv:
    if environ is None:
        _die_with_torchrun_agent()
    env = os.environ if environ is None else environ
    for name, rank_var, size_var, local_var in _LAUNCHERS:
        if rank_var in env and size_var in env:
            rank, size = int(env[rank_var]), int(env[size_var])
            local = int(env.get(local_var, rank)) if local_var in env or name != "mpich" else _mpich_local(env, rank)
            if name == "slurm" and size > 1 and "MASTER_ADDR" not in env:
                raise RuntimeError(
                    "launched by srun with several tasks but MASTER_ADDR is not set: export "
                    "MASTER_ADDR to the first node's host name (see examples/slurm_pretrain.sh)")
            addr = env.get("MASTER_ADDR") or (_mpi_root_host() if name in ("openmpi", "mvapich", "mpich") else None)
            return LaunchEnv(name, rank, size, local, addr or "127.0.0.1",
                             int(env.get("MASTER_PORT", DEFAULT_PORT)))
    # One process on its own: any free port, so concurrent jobs on a machine never collide.
    return LaunchEnv("single", 0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"),
                     int(env.get("MASTER_PORT") or _free_port()))


def _die_with_torchrun_agent() -> None:
    """In a torchrun worker (TORCHELASTIC_RUN_ID is set by the elastic agent only; RANK alone is also
    set by export_torch_env for single runs), ask for SIGKILL when the agent dies. The agent starts
    workers from its main thread, so PDEATHSIG fires only when the agent process ends; it does
    that only after its workers are stopped, except when it is killed outright: the case this covers.
    The agent's pid is not passed to workers, so an agent that died before this call is recognised
    by the worker having been re-parented to init."""
    global _bound_to_agent
    if _bound_to_agent or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    from megatron_seed.platform.processes import die_with_parent

    die_with_parent()
    _bound_to_agent = True


_bound_to_agent = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mpich_local(env, rank: int) -> int:
    return int(env.get("MPI_LOCALRANKID", env.get("PMI_LOCAL_RANK", rank)))


def _mpi_root_host():
    """Rank 0's host name, broadcast with mpi4py when it is installed; None otherwise."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD.bcast(socket.gethostname() if MPI.COMM_WORLD.Get_rank() == 0 else None, root=0)


def export_torch_env(launch: LaunchEnv) -> None:
    """Set the variables torch.distributed's env:// rendezvous reads."""
    os.environ.update(
        RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank),
        MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port),
    )
