#!/usr/bin/env bash
# Stage 5 of the built-in model (issue 12, in progress): stage 4's losses with the image encoder trained too.
# Why: after stage 4 the training Dice still rose, and the encoder (4 blocks, 384 wide) has had only stage 1's 2600
# steps from scratch; a first try of encoder training (`mais train`, encoder 4e-5, Dice alone, 217 steps from the
# stage-3 result) cost ~1.5x per step and showed no training-Dice gain over the frozen encoder in that window (Dice
# alone: saturated logits, see scripts/train_builtin_stage4.sh), so it is tried again with the stage-4 losses.
# Recipe: `mais train` from stage 4's result (runs/mais-small-shared-s4/model.pth): encoder 4e-5, prompt encoder +
# decoder 8e-5, memory 8e-5, head 3e-4; Dice + cross-entropy (1), click loss 0.2, half the correction clicks at the
# centre of the largest error component; 1000 steps, x0.1 at 64.5% and 90%; ~7 s per step on the 2-core CPU.
# Resumable: run it again and it continues from runs/mais-small-shared-s5/last.pth.
#   nohup bash scripts/train_builtin_stage5.sh > runs/train5.log 2>&1 &
# Then compare on the test split with the released model before any release:
#   .venv/bin/mais evaluate --manifest ../shared/data/manifest.json --split test --methods mais \
#     --checkpoint runs/mais-small-shared-s5/model.pth --clicks 1,5,10,20 --out runs/s5_test.json
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/mais-small-shared-s5
START="${START:-runs/mais-small-shared-s4/model.pth}"
export MAIS_CACHE_DIR="${MAIS_CACHE_DIR:-$PWD/runs/cache}"
RESUME=()
if [ -f "$OUT/last.pth" ]; then
  RESUME=(--resume)
elif [ ! -f "$START" ]; then
  echo "no $START: run scripts/train_builtin_stage4.sh first, or give START=<checkpoint>" >&2
  exit 2
fi
.venv/bin/mais train --manifest ../shared/data/manifest.json --split train \
  --checkpoint "$START" \
  --ce-weight 1 --center-click-prob 0.5 --click-loss-weight 0.2 \
  --lr-encoder 4e-5 --lr-prompt-decoder 8e-5 --lr-memory 8e-5 --lr-fullres 3e-4 \
  --steps "${TRAIN_STEPS:-1000}" --batch-size 2 --episode-clicks 8 --tbptt 4 --memory-size 60 \
  --loss-size 32 --cpu-bf16 --checkpoint-every 25 --device cpu --seed 5 \
  --model-id mais-small-shared --version 0.4.0 --out "$OUT" "${RESUME[@]}" "$@"
