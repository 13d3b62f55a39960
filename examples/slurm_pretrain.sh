#!/usr/bin/env bash
#SBATCH --job-name=megatron-seed
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
# Multi-node pretraining: one torchrun per node, rendezvous at the first node (c10d backend).
set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR=$head_node MASTER_PORT=${MASTER_PORT:-29500}
srun torchrun \
  --nnodes="$SLURM_NNODES" --nproc_per_node="${GPUS_PER_NODE:-8}" \
  --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
  -m megatron_seed.pretrain --preset seed_coder_8b \
  parallel.tensor=8 parallel.pipeline=2 parallel.distributed_optimizer=true \
  data.blend="[${DATA_PREFIX:?set DATA_PREFIX to a .bin/.idx prefix}]" \
  train.save=checkpoints/seed_coder_8b train.save_interval=1000 train.load=checkpoints/seed_coder_8b "$@"
# Without torchrun: `srun --ntasks-per-node=8 python -m megatron_seed.pretrain ...` (ranks from
# SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, MASTER_ADDR as above) or `mpirun -np N python -m ...`.
