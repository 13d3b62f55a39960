"""On-policy DPO pairs from code problems: sample, judge in the sandbox, pair passing with failing
replies. See megatron_seed/evaluate/pairs.py or ``--help``."""

import os
import sys

# Runnable from a checkout without installing (as Megatron-LM's tools are).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_seed.evaluate.pairs import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
