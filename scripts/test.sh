#!/usr/bin/env bash
# Set up the venv (scripts/setup_env.sh: .venv, or $REALEDIT_VENV) and run the whole test suite. Extra
# arguments go to pytest. REALEDIT_REQUIRE_COMFYUI=1 turns a missing ComfyUI into failures (CI sets it).
# ComfyUI-host tests use $COMFYUI_PATH or /opt/ComfyUI and are skipped, with the reason shown, without one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root/tests"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1
exec "${REALEDIT_VENV:-$root/.venv}/bin/python" -m pytest "$@"
