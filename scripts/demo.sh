#!/usr/bin/env bash
# Set up .venv (scripts/setup_env.sh) and run the demo: every method on the shapes world (--model tiny: the
# built-in random-weight model).
# Extra arguments go to the demo (python -m realedit.demo --help), e.g. --checkpoint model.safetensors.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${REALEDIT_VENV:-$root/.venv}/bin/python" -m realedit.demo "$@"
