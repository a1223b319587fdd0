#!/usr/bin/env bash
# Pilot runs of the full-resolution mask path (issue 12), on CPU, side by side from the built-in model:
#   PILOT=fullres  adds a fresh full-resolution head (--fullres) and fine-tunes it with the decoder and memory
#   PILOT=control  the same fine-tuning without the head (separates the head's effect from the extra training)
# Encoder frozen (finetune mode: no encoder backward, ~2x cheaper on a CPU), decoder/memory at 8e-5, the head at
# 8e-4 (fresh), Dice loss of the decoder on its 32^3 logits (--loss-size 32), of the head at 128^3.
# Resumable: run it again with the same PILOT and it continues from runs/pilot-$PILOT/last.pth.
#   PILOT=fullres nohup bash scripts/train_fullres_pilot.sh --steps 300 > runs/pilot-fullres.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
PILOT="${PILOT:-fullres}"
OUT="runs/pilot-$PILOT"
export MAIS_CACHE_DIR="${MAIS_CACHE_DIR:-$PWD/runs/cache}"
EXTRA=()
[ "$PILOT" = fullres ] && EXTRA=(--fullres)
RESUME=()
[ -f "$OUT/last.pth" ] && RESUME=(--resume)
.venv/bin/mais finetune --manifest ../shared/data/manifest.json --split train \
  --checkpoint Resources/models/mais-small-shared.pth "${EXTRA[@]}" \
  --steps 300 --batch-size 2 --episode-clicks 8 --tbptt 4 --memory-size 60 \
  --loss-size 32 --cpu-bf16 --checkpoint-every 20 --device cpu --seed 1 \
  --model-id "mais-small-$PILOT-pilot" --version 0.0.1 --out "$OUT" "${RESUME[@]}" "$@"
