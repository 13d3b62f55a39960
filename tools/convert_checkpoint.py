"""Hugging Face Llama <-> megatron-seed checkpoint conversion. See
megatron_seed/convert/hf_checkpoint.py or ``--help``."""

import os
import sys

# Runnable from a checkout without installing (as Megatron-LM's tools are).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_seed.convert.hf_checkpoint import main  # noqa: E402

if __name__ == "__main__":  # required: dist_checkpointing starts spawned helper processes
    sys.exit(main())
