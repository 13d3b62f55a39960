"""Concatenate Megatron indexed datasets made with the same tokenizer.

    python tools/merge_datasets.py --input DIR_OR_PREFIX [...] --output-prefix OUT

A directory argument contributes every ``*.idx`` in it (sorted by name), as Megatron-LM's
``tools/merge_datasets.py`` does; other arguments are dataset prefixes.
"""

import argparse
import glob
import os
import sys

# Runnable from a checkout without installing (as Megatron-LM's tools are).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_seed.data.indexed import merge_datasets
from megatron_seed.platform.cli import add_check_config, config_ok  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="directories of .bin/.idx pairs or prefixes")
    p.add_argument("--output-prefix", required=True)
    add_check_config(p)
    args = p.parse_args(argv)
    if config_ok(args, "tools/merge_datasets.py"):
        return 0
    prefixes = []
    for item in args.input:
        if os.path.isdir(item):
            prefixes += sorted(path[:-4] for path in glob.glob(os.path.join(item, "*.idx")))
        else:
            prefixes.append(item[:-4] if item.endswith((".bin", ".idx")) else item)
    try:
        n = merge_datasets(prefixes, args.output_prefix)
    except (FileNotFoundError, ValueError) as e:
        print(f"[merge] error: {e}", file=sys.stderr)
        return 1
    print(f"[merge] {len(prefixes)} datasets -> {args.output_prefix}.bin/.idx ({n} documents)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
