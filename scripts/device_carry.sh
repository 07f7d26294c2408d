#!/usr/bin/env bash
# Prepare .devcarry/ for a GPU lease (see testbed/shapes_world_models/README.md): a copy of a ComfyUI
# checkout without its models, tests or git history, and the wheels of what the device image lacks
# (torchsde, trampoline), for Python 3.12 on x86-64. .devcarry is kept out of git (.git/info/exclude);
# name it in the device call's `carry`.
#   COMFYUI_PATH  the checkout to copy (required)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
comfy="${COMFYUI_PATH:?set COMFYUI_PATH to a ComfyUI checkout}"
carry="$root/.devcarry"
grep -qx '/.devcarry/' "$root/.git/info/exclude" 2>/dev/null || echo '/.devcarry/' >>"$root/.git/info/exclude"
rm -rf "$carry" && mkdir -p "$carry/whl"
cp -r "$comfy" "$carry/ComfyUI"
(cd "$carry/ComfyUI" && rm -rf .git models output input tests tests-unit comfy_api_nodes custom_nodes/* \
  && find . -name __pycache__ -prune -exec rm -rf {} +)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d "$carry/whl" torchsde==0.2.6 trampoline==0.1.2
du -sh "$carry"
