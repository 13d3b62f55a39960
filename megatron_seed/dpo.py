"""Direct preference optimization entry point: the pretraining trainer with the DPO objective.

    python -m megatron_seed.dpo --preset NAME train.load=CKPT train.finetune=true data.train=PAIRS \
        [data.valid=PAIRS] [dpo.beta=0.1] [dpo.loss_type=sigmoid|robust|ipo|hinge] \
        [dpo.label_smoothing=0] [dpo.sft_weight=0] [ref.load=CKPT] [ref.mode=precomputed|live] ...
    torchrun --nproc_per_node=N -m megatron_seed.dpo ...  (TP / PP / DP / SP as for pretraining)

Pairs: jsonl / jsonl.gz / parquet in TRL's format, ``prompt`` (a string or messages), ``chosen`` and
``rejected`` (strings or assistant messages), e.g. from ``tools/build_dpo_pairs.py``. Reference
log-probs are computed once before training and cached beside the data
(megatron_seed.training.objectives.dpo).
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from megatron_seed.training.entry import run_training

    return run_training(argv, "python -m megatron_seed.dpo", __doc__, objective="dpo")


if __name__ == "__main__":
    sys.exit(main())
