#!/usr/bin/env bash
# Create (or update) .venv with everything the demo and the tests need.
#   TORCH_SPEC   torch requirement to install (default torch==2.13.0, the version the pack is tested on)
#   COMFYUI_PATH a ComfyUI checkout to install requirements for (default /opt/ComfyUI, if present)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
log() { printf '[setup] %s\n' "$*" >&2; }

[[ -x "$venv/bin/python" ]] || { log "creating $venv"; "$py" -m venv "$venv"; }
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
constraints="$(mktemp)"; trap 'rm -f "$constraints"' EXIT
echo "${TORCH_SPEC:-torch==2.13.0}" > "$constraints"

log "installing torch (${TORCH_SPEC:-torch==2.13.0}) and the pack with its test extras"
"${pip[@]}" -c "$constraints" "${TORCH_SPEC:-torch==2.13.0}"
"${pip[@]}" -c "$constraints" -e "$root[test]" 2>&1 | grep -v 'is ignored' >&2 || true
"$venv/bin/python" -c "import realedit" || { log "the pack did not install"; exit 1; }

comfy="${COMFYUI_PATH:-/opt/ComfyUI}"
if [[ -f "$comfy/requirements.txt" ]]; then
  log "ComfyUI found at $comfy: installing its requirements against the pinned torch"
  "${pip[@]}" -c "$constraints" -r "$comfy/requirements.txt" 2>&1 | grep -v 'is ignored' >&2 || true
else
  log "no ComfyUI at $comfy: ComfyUI-host tests will be skipped (set COMFYUI_PATH to use one)"
fi

# A CUDA-only torchvision on a CPU torch cannot import; let it (see compat/torchvision_ops.py).
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$root/compat/torchvision_ops.py" "$site/realedit_torchvision_fallback.py"
echo "import realedit_torchvision_fallback; realedit_torchvision_fallback.install_import_hook()" \
  > "$site/zz_realedit_torchvision_fallback.pth"
"$venv/bin/python" -c "import torchvision" || { log "torchvision does not import"; exit 1; }
log "ready: $venv"
