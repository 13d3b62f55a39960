#!/usr/bin/env bash
# Refreshes requirements-cpu.lock to the newest releases setup.py allows and runs the test suite
# on them, in a fresh virtual environment (so nothing else installed here enters the lock):
#   bash tools/refresh_lock.sh            # then review `git diff requirements-cpu.lock` and commit
# VENV=/path keeps the environment somewhere else (default: a temporary folder, removed at the end).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$(mktemp -d)/venv}"
[ -n "${VENV:-}" ] || trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
cd "$here"
LOCK=latest bash install.sh
python -m pytest -q tests
