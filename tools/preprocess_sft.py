"""SFT conversations (jsonl / jsonl.gz / jsonl.zst / parquet) -> a prefix for data.train=PREFIX. See
megatron_seed/data/preprocess_sft.py or ``--help`` for the interface."""

import os
import sys

# Runnable from a checkout without installing (as Megatron-LM's tools are).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_seed.data.preprocess_sft import main

if __name__ == "__main__":
    sys.exit(main())
