"""Train a byte-level BPE (default) or sentencepiece code tokenizer with Seed-Coder's special and
FIM tokens. See megatron_seed/data/tokenizer_training.py or ``--help``."""

import os
import sys

# Runnable from a checkout without installing (as Megatron-LM's tools are).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_seed.data.tokenizer_training import main

if __name__ == "__main__":
    sys.exit(main())
