#!/usr/bin/env bash
# One node, N processes (GPUs, or CPU processes with gloo when no GPU is present).
set -euo pipefail
NPROC=${NPROC:-2}
torchrun --standalone --nproc_per_node="$NPROC" -m megatron_seed.pretrain --config examples/tiny.yaml \
  parallel.tensor=2 "$@"
