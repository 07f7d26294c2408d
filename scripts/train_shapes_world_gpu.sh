#!/usr/bin/env bash
# Train the shapes world on one GPU machine in about nine minutes: the stages of
# `python -m realedit.testbed.shapes_world train` side by side (decoder beside data; the two UNets of
# each variant beside those of the others, the IP2P UNet's edit grounding after it), then the gates of each
# variant. What comes back (fp16 stage files under their cache names, report.json, log.txt) goes to $OUT; drop
# the stage files into $REALEDIT_CACHE/shapes_world/ and run `train --recipe gpu --stage pack` to write the
# committed checkpoints.
#   PYTHON        a Python with CUDA torch and ComfyUI's requirements (default python3)
#   COMFYUI_PATH  a ComfyUI checkout; the pack must be importable as `realedit`
#   OUT           results (default ./shapes_world_gpu); REALEDIT_CACHE: stage files (default /tmp/realedit-cache)
#   SECONDS_VAE / _DECODER / _UNET / _GROUNDING   time caps of those stages (default 100 / 80 / 170 / 60)
#   VARIANTS      the UNet variants trained side by side (default "default wide"): default (the config),
#                 wide (--unet-channels $WIDE), eps / v (--prediction eps / v); a device call returns
#                 at most 8 files, so at most two variants
#   WIDE          model_channels of the wide variant (default 64)
#   SMOKE=1       tiny data and steps: checks this script on a CPU in a few minutes
set -uo pipefail
py="${PYTHON:-python3}"
out="${OUT:-./shapes_world_gpu}"; mkdir -p "$out"; out="$(cd "$out" && pwd)"
export REALEDIT_CACHE="${REALEDIT_CACHE:-/tmp/realedit-cache}" PYTHONUNBUFFERED=1
cpus="$(nproc)"; wide="${WIDE:-64}"; read -r -a variants <<<"${VARIANTS:-default wide}"
smoke=(); [[ "${SMOKE:-0}" == 1 ]] && smoke=(--smoke)
log="$out/log.txt"

train() {  # train NAME ARGS...: one stage process, its output prefixed with NAME in log.txt
  local name="$1"; shift
  "$py" -m realedit.testbed.shapes_world train --recipe gpu "${smoke[@]}" --threads 2 "$@" 2>&1 \
    | grep --line-buffered -v -e '^Requested to load' -e '^loaded completely' -e '^Using ' \
    | sed -u "s/^/[$name] /" >>"$log"
  local rc="${PIPESTATUS[0]}"
  echo "[$name] exit $rc after ${SECONDS} s" >>"$log"
  return "$rc"
}
options() {  # options VARIANT: its train arguments
  case "$1" in
    default) ;;
    eps | v) echo "--prediction $1" ;;
    wide) echo "--unet-channels $wide" ;;
    *) echo "unknown variant $1 (default, wide, eps, v)" >&2; return 1 ;;
  esac
}
for v in "${variants[@]}"; do options "$v" >/dev/null || exit 1; done

echo "start $(date -u +%T); $cpus CPUs; $("$py" -c 'import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())')" >"$log"
train vae --stage vae --workers "$cpus" --seconds "${SECONDS_VAE:-100}" --export "$out" || exit 1
train decoder --stage decoder --workers 4 --seconds "${SECONDS_DECODER:-80}" --export "$out" &
train data --stage data --workers $((cpus > 4 ? cpus - 4 : 1)) || exit 1
for v in "${variants[@]}"; do
  # shellcheck disable=SC2046
  train "t2i-$v" --stage t2i $(options "$v") --seconds "${SECONDS_UNET:-170}" --export "$out" &
  # the IP2P rounds' file stays in the cache: the checkpoint packs the edit-grounding stage's (8 files come back)
  # shellcheck disable=SC2046
  { train "ip2p-$v" --stage ip2p $(options "$v") --seconds "${SECONDS_UNET:-170}" \
      && train "ip2p_grounding-$v" --stage ip2p_grounding $(options "$v") --seconds "${SECONDS_GROUNDING:-60}" \
         --export "$out"; } &
done
wait
for v in "${variants[@]}"; do
  # shellcheck disable=SC2046
  train "measure-$v" --stage measure $(options "$v") --report "$REALEDIT_CACHE/report-$v.json" &
done
wait
"$py" - "$REALEDIT_CACHE" "$out/report.json" <<'PY'
import json, pathlib, sys
cache = pathlib.Path(sys.argv[1])
report = {p.stem.removeprefix("report-"): json.loads(p.read_text()) for p in sorted(cache.glob("report-*.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(report, indent=2))
PY
echo "done $(date -u +%T) after ${SECONDS} s" >>"$log"
