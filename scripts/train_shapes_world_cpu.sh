#!/usr/bin/env bash
# Train the shapes world on two CPU cores with the CPU recipe (config.CPU_RECIPE), then pack the committed
# checkpoints and measure their gates: the stages of `python -m realedit.testbed.shapes_world train` with
# both cores busy throughout (the VAE and the data on two threads; then the two UNets and the decoder side
# by side on one thread each: three processes on two cores, as the UNets do not need the decoder; the IP2P
# UNet's edit-grounding fine-tuning follows its rounds).
# `train --recipe cpu --threads 2` runs the same stages one after the other in about the same time. The log
# goes to $LOG (default ./shapes_world_cpu.log; a rerun appends). Stopped, the same command goes on: finished
# stages and rounds are cached, and a UNet round keeps its progress every 500 steps.
#   PYTHON        a Python with torch and ComfyUI's requirements (default .venv/bin/python)
#   COMFYUI_PATH  a ComfyUI checkout; the pack must be importable as `realedit`
#   PREDICTION    what the UNets predict (default: the config's, v: v-prediction); eps: SD1.5's objective
#   ROUNDS        rounds of UNet training (default: the recipe's; config.WorldConfig.unet_rounds): round r
#                 restarts from round r - 1's weights, and the rounds already in the cache are not rerun
#   CAP           optional --seconds cap on every stage (a stage that would overrun plans fewer steps,
#                 recorded in the stage file and gates.json); none by default: the recipe's step counts
#                 are what it trains, whatever else the machine does (a cap plans from the rate of a few
#                 early steps, which another process can slow)
set -uo pipefail
py="${PYTHON:-.venv/bin/python}"
log="${LOG:-./shapes_world_cpu.log}"
export PYTHONUNBUFFERED=1

cap=(); [[ -n "${CAP:-}" ]] && cap=(--seconds "$CAP")
unet=()  # the UNet stages' settings, also given to pack (it names their files by them)
[[ -n "${PREDICTION:-}" ]] && unet+=(--prediction "$PREDICTION")
[[ -n "${ROUNDS:-}" ]] && unet+=(--rounds "$ROUNDS")

train() {  # train NAME ARGS...: one stage process, its output prefixed with NAME in the log
  local name="$1"; shift
  "$py" -m realedit.testbed.shapes_world train --recipe cpu "${cap[@]}" "$@" 2>&1 \
    | grep --line-buffered -v -e '^Requested to load' -e '^loaded completely' -e '^Using ' \
    | sed -u "s/^/[$name] /" >>"$log"
  local rc="${PIPESTATUS[0]}"
  echo "[$name] exit $rc after ${SECONDS} s" >>"$log"
  return "$rc"
}

echo "start $(date -u +%T)" >>"$log"
train vae --stage vae --threads 2 --workers 2 || exit 1
train data --stage data --threads 2 --workers 2 || exit 1
train decoder --stage decoder --threads 1 &
train t2i --stage t2i --threads 1 "${unet[@]}" &
{ train ip2p --stage ip2p --threads 1 "${unet[@]}" \
    && train ip2p_grounding --stage ip2p_grounding --threads 1 --workers 2 "${unet[@]}"; } &
wait
train pack --stage pack --threads 2 "${unet[@]}" || exit 1
echo "done $(date -u +%T) after ${SECONDS} s" >>"$log"
