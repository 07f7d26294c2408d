#!/usr/bin/env bash
# Create (or update) .venv with everything the demo and the tests need.
#   TORCH_SPEC   torch requirement to install (default torch==2.13.0, the version the pack is tested on)
#   COMFYUI_PATH a ComfyUI checkout to install requirements for (default /opt/ComfyUI, if present)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${REALEDIT_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
log() { printf '[setup] %s\n' "$*" >&2; }

[[ -x "$venv/bin/python" ]] || { log "creating $venv"; "$py" -m venv "$venv"; }
pip_log="$(mktemp)"
pip() {  # quiet pip install; on failure show its output and stop
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >"$pip_log" 2>&1 \
    || { grep -v 'is ignored' "$pip_log" >&2; log "pip install $* failed"; exit 1; }
}
constraints="$(mktemp)"; trap 'rm -f "$constraints" "$pip_log"' EXIT
echo "${TORCH_SPEC:-torch==2.13.0}" > "$constraints"

log "installing torch (${TORCH_SPEC:-torch==2.13.0}) and the pack with its test extras"
pip -c "$constraints" "${TORCH_SPEC:-torch==2.13.0}"
pip -c "$constraints" -e "$root[test]"
"$venv/bin/python" -c "import realedit" || { log "the pack did not install"; exit 1; }

comfy="${COMFYUI_PATH:-/opt/ComfyUI}"
if [[ -f "$comfy/requirements.txt" ]]; then
  log "ComfyUI found at $comfy: installing its requirements against the pinned torch"
  pip -c "$constraints" -r "$comfy/requirements.txt"
  # The registry's torchaudio may be built for another torch; transformers (and so diffusers) then
  # fail to import. ComfyUI runs without it (only its audio models need it), and so does the pack.
  if ! "$venv/bin/python" -c "import torchaudio" >/dev/null 2>&1; then
    log "torchaudio does not load against this torch: uninstalling it"
    "$venv/bin/python" -m pip uninstall --quiet --yes torchaudio
  fi
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
