"""Pretraining entry point.

    python -m megatron_seed.pretrain [--config FILE] [key.sub=value ...]
    torchrun --nproc_per_node=N -m megatron_seed.pretrain --config FILE [key.sub=value ...]
    mpirun -np N python -m megatron_seed.pretrain --config FILE [...]
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from megatron_seed.training.entry import run_training

    return run_training(argv, "python -m megatron_seed.pretrain", __doc__)


if __name__ == "__main__":
    sys.exit(main())
