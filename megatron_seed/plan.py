"""Memory planner: will this layout fit in device memory? Per-rank bytes, and what to change if not.

    python -m megatron_seed.plan --preset seed_coder_8b parallel.tensor=8 parallel.sequence_parallel=true \\
        data.seq_length=32768 train.recompute=full [--device-memory 80GiB] [--world-size N] [--json]
    python -m megatron_seed.plan --preset seed_coder_8b parallel.tensor=4 parallel.sequence_parallel=true \\
        parallel.context=2 data.seq_length=32768

Same config as the training entry points (``--config FILE``, ``--preset NAME``, ``a.b=value``);
``--world-size`` defaults to one data-parallel replica (tensor x pipeline x context). ``--device cpu`` plans
a CPU run (torch kernels, no CUDA allowance). ``--measure`` also trains two steps of the layout on
this machine and prints planned vs measured bytes per category (launch it with torchrun for TP/PP/CP).
Exit status: 0 fits, 1 does not fit, 2 config error.
The model behind the numbers: megatron_seed.planning.memory.
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_seed.platform.cli import add_check_config, config_ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_seed.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML/JSON run config (may name a `preset:`)")
    parser.add_argument("--preset", help="named preset (tiny, llama_100m, smollm2_135m, seed_coder_8b)")
    parser.add_argument("--device-memory", default="80GiB", help="memory per device (default 80GiB)")
    parser.add_argument("--world-size", type=int, help="ranks in the job (default tensor x pipeline x context)")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="device kind (default gpu)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--measure", action="store_true",
                        help="also run two training steps of the layout here (torchrun for several ranks) and "
                             "print planned vs measured bytes")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides, applied last")
    add_check_config(parser)
    args = parser.parse_intermixed_args(argv)

    from megatron_seed.config import ConfigError, load_config
    from megatron_seed.planning.memory import format_plan, parse_bytes, plan_memory
    from megatron_seed.training.objective import CONFIG_CHECKS

    try:
        run = load_config(args.config, args.overrides, preset=args.preset)
        plan = plan_memory(run, args.world_size, args.device, parse_bytes(args.device_memory),
                           objective=CONFIG_CHECKS)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if config_ok(args, parser.prog):
        return 0
    if args.measure:
        from megatron_seed.planning.measure import measure_against_plan

        report = measure_against_plan(run)
        if report is None:  # not the first rank
            return 0
        print(report)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
