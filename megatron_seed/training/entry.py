"""The body every training entry point shares (``pretrain``, ``sft``, later ``dpo`` and ``rl``):
config from a preset, a file and ``a.b=value`` overrides, the objective the entry point names, the
one trainer, clean shutdown. Config errors exit with status 2 and name the key."""

from __future__ import annotations

import argparse
import sys
from typing import Optional


def run_training(argv: Optional[list], prog: str, doc: str, objective: Optional[str] = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML/JSON run config (may name a `preset:`)")
    parser.add_argument("--preset", help="named preset (tiny, llama_100m, smollm2_135m, seed_coder_8b)")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides, applied last")
    args = parser.parse_intermixed_args(argv)

    from megatron_seed.config import ConfigError, load_config

    overrides = list(args.overrides)
    if objective is not None:  # the entry point decides what it trains
        overrides.append(f"train.objective={objective}")
    try:
        run = load_config(args.config, overrides, preset=args.preset)
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
