"""Supervised fine-tuning entry point: the pretraining trainer with the SFT objective.

    python -m megatron_seed.sft --preset NAME train.load=CKPT train.finetune=true data.train=FILE \
        [data.valid=FILE] [data.packing=true] [data.train_on_all_tokens=false] [key.sub=value ...]
    torchrun --nproc_per_node=N -m megatron_seed.sft ...  (TP / PP / DP / SP as for pretraining)

Records: jsonl / jsonl.gz / parquet with OpenAI-style ``messages`` or ``prompt`` + ``completion``,
rendered with the tokenizer's chat template (``data.tokenizer``; ``data.chat_template`` overrides
it), loss on each assistant turn's content and end-of-turn token, packed whole into
``data.seq_length`` rows that samples never attend across (megatron_seed.training.objectives.sft).
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from megatron_seed.training.entry import run_training

    return run_training(argv, "python -m megatron_seed.sft", __doc__, objective="sft")


if __name__ == "__main__":
    sys.exit(main())
