"""Corpus (jsonl / jsonl.gz / jsonl.zst / parquet) -> Megatron .bin/.idx. See
megatron_seed/data/preprocess.py or ``--help`` for the interface (Megatron-LM's, plus FIM)."""

import os
import sys

# Runnable from a checkout without installing (as Megatron-LM's tools are).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_seed.data.preprocess import main

if __name__ == "__main__":  # required: workers are spawned and re-import this file
    sys.exit(main())
