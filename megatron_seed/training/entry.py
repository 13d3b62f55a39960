"""The body every training entry point shares (``pretrain``, ``sft``, later ``dpo`` and ``rl``):
config from a preset, a file and ``a.b=value`` overrides, the objective the entry point names, the
one trainer, clean shutdown. A file that lists ``stages:`` runs them in sequence
(:mod:`megatron_seed.training.stages`). Config errors exit with status 2 and name the key."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from megatron_seed.platform.cli import add_check_config, config_ok


def run_training(argv: Optional[list], prog: str, doc: str, objective: Optional[str] = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML/JSON run config (may name a `preset:`)")
    parser.add_argument("--preset", help="named preset (tiny, llama_100m, smollm2_135m, seed_coder_8b)")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides, applied last")
    add_check_config(parser)
    args = parser.parse_intermixed_args(argv)

    from megatron_seed.config import ConfigError, load_config
    from megatron_seed.platform import launch
    from megatron_seed.training import stages as staged
    from megatron_seed.training.objective import CONFIG_CHECKS

    overrides = list(args.overrides)
    if objective is not None:  # the entry point decides what it trains
        overrides.append(f"train.objective={objective}")
    world = launch.detect()
    try:
        # A file with `stages:` is several runs in sequence (megatron_seed.training.stages), all
        # validated here, before the first trains.
        stages = staged.read_stages(args.config, overrides, preset=args.preset)
        if stages is None:
            run = load_config(args.config, overrides, preset=args.preset)
            run.validate(world.world_size, CONFIG_CHECKS)
        else:
            staged.plan_stages(stages, world.world_size)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if config_ok(args, prog, f"world size {world.world_size}, "
                 + (f"{len(stages)} stages" if stages is not None else f"objective {run.train.objective}")):
        return 0
    from megatron_seed.platform import distributed
    from megatron_seed.training.build import build_run

    try:
        if stages is None:
            trainer = build_run(run)
        else:
            staged.run_stages(stages, build_run, staged.stderr_on_rank0(world.rank))
    except ConfigError as err:  # found at start-up (e.g. by reading train.load's checkpoint)
        print(f"config error: {err}", file=sys.stderr)
        distributed.shutdown()
        return 2
    if stages is None:
        trainer.fit()
    distributed.shutdown()
    return 0
