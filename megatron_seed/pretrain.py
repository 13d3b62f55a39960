"""Pretraining entry point.

    python -m megatron_seed.pretrain [--config FILE] [key.sub=value ...]
    torchrun --nproc_per_node=N -m megatron_seed.pretrain --config FILE [key.sub=value ...]
    mpirun -np N python -m megatron_seed.pretrain --config FILE [...]
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_seed.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML/JSON run config (may name a `preset:`)")
    parser.add_argument("--preset", help="named preset (tiny, llama_100m, smollm2_135m, seed_coder_8b)")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides, applied last")
    args = parser.parse_intermixed_args(argv)

    from megatron_seed.config import ConfigError, load_config

    try:
        run = load_config(args.config, args.overrides, preset=args.preset)
        from megatron_seed.platform import launch

        run.validate(launch.detect().world_size)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from megatron_seed.platform import distributed
    from megatron_seed.training.build import build_pretraining

    try:
        trainer = build_pretraining(run)
    except ConfigError as err:  # found at start-up (e.g. by reading train.load's checkpoint)
        print(f"config error: {err}", file=sys.stderr)
        distributed.shutdown()
        return 2
    trainer.fit()
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
