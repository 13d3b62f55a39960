"""Process groups: torch.distributed + megatron-core parallel state, on GPU (NCCL) or CPU (gloo)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch

from megatron_seed.platform import launch, megatron_cpu


@dataclass(frozen=True)
class ParallelContext:
    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp: int
    pp: int
    dp: int
    vpp: int | None
    device: torch.device
    launcher: str
    cp: int = 1  # context-parallel size: ranks sharing each sequence
    cp_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def initialize(tp: int = 1, pp: int = 1, vpp: int | None = None, seed: int = 1234,
               timeout_minutes: int = 30, cp: int = 1) -> ParallelContext:
    """Start torch.distributed from the launcher's environment and build megatron's groups."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    env = launch.detect()
    on_cpu = megatron_cpu.apply()
    if not torch.distributed.is_initialized():
        launch.export_torch_env(env)
        if not on_cpu:
            torch.cuda.set_device(env.local_rank)
        torch.distributed.init_process_group(
            backend="gloo" if on_cpu else "nccl", rank=env.rank, world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
    )
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)  # on CPU the tracker set-up above reseeds the default generator
    world = torch.distributed.get_world_size()
    return ParallelContext(
        rank=torch.distributed.get_rank(), world_size=world, local_rank=env.local_rank,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp=tp, pp=pp, dp=world // (tp * pp * cp), vpp=vpp,
        device=torch.device("cpu") if on_cpu else torch.device("cuda", env.local_rank),
        launcher=env.launcher, cp=cp, cp_rank=parallel_state.get_context_parallel_rank(),
    )


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class single_process:
    """``with single_process() as ctx:`` a one-process group (TP = PP = DP = 1) for tools that use
    megatron-core outside a launcher (conversion, generation); torn down on exit unless one
    already existed."""

    def __init__(self, seed: int = 1234):
        self.seed = seed
        self._owned = False

    def __enter__(self) -> ParallelContext:
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() != 1:
            raise RuntimeError("single_process() inside a multi-process job: run this tool with one process")
        self._owned = not torch.distributed.is_initialized()
        return initialize(seed=self.seed)

    def __exit__(self, *exc) -> None:
        if self._owned:
            shutdown()
