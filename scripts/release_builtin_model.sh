#!/usr/bin/env bash
# Release the built-in model mais-small-shared (0.3.0: 0.2.0 continued by scripts/train_fullres_pilot.sh and
# scripts/train_builtin_stage4.sh): export the training checkpoint as the bundled int8 weight file (<= 25 MB), then
# measure the model card's figures on the exported file itself (not on the training checkpoint), and register it.
#   bash scripts/release_builtin_model.sh                    # export eval demo register (about 1-2 h on 2 cores)
#   GROWCUT=1 FEWSHOT=1 BENCH=1 bash scripts/release_builtin_model.sh   # also the slow / optional figures
#   STEPS="eval" bash scripts/release_builtin_model.sh       # only some of: export eval demo fewshot bench register
# Give every step of one release the same variables (register reads the files the chosen steps wrote):
#   CKPT     training checkpoint (runs/mais-small-shared-s4/model.pth); LOG its log.csv (same folder)
#   VERSION  0.3.0; DTYPE storage of the bundled file, int8 (float16 does not fit the 25 MB limit)
#   PRECISION  inference precision of the figures: auto (default) is resolved once here (bfloat16 on a CPU with native
#            bfloat16) and every command is pinned to what it chose, so the card can say what the figures used
#   GROWCUT=1  also Slicer's Grow from seeds in the test-split run (over an hour on this CPU); without it the card
#            quotes the Grow-from-seeds figures of 0.1.0's release runs (same split and robot; weights play no part)
#   FLOAT16_CHECK=0  skip the float16 export evaluated beside the int8 file (what int8 rounding costs in Dice)
#   FEWSHOT=1  the few-shot curve (mais fewshot; about an hour); without it the card keeps 0.1.0's, labelled so
#   BENCH=1    mais bench --preset mais-small-fr (latency of this network's shape) for the card's latency table
# The test-split run: MAIS / no memory / MAIS with zoom (opt-in) / oracle-32 / oracle-128 (+ growcut, + the float16 file)
# at 1, 5, 10, 20 clicks, center robot, seed 0. Results go to runs/release/ (not committed); "register" copies the
# file to Resources/models/, makes it the default in Resources/models.json and writes its card
# Resources/models/mais-small-shared.md (scripts/register_builtin_model.py, scripts/model_card_template.md).
#
# Few-shot recipe (FEWSHOT=1): fine-tuning on 1 and 3 training cases of the mandible (OpenKBP), one of 0.1.0's weakest
# families (Dice@10 0.31), 60 steps with the image encoder, prompt encoder and decoder at 2e-5 (the memory follows the
# decoder) and the Dice loss at 64^3: this from-scratch encoder is the weak part, so unlike the MAIS recipe (for a
# SAM-Med3D encoder pretrained at scale) it is not frozen. Attempts on 0.1.0, 2 test targets each, Dice@5 base -> k=1 /
# k=3:
#   ROIs grown from the whole mask (before SessionOptions.grow_connected): myocardium, 100 steps at 8e-5, memory
#   8e-4: 0.192 -> 0.076 / 0.064; memory at 8e-5: 0.094 / 0.053; mandible, 60 steps, 8e-5: 0.262 -> 0.295 / 0.165;
#   2e-5: 0.309 / 0.232.
#   ROIs grown from the include-connected mask (the default now): mandible, encoder frozen, 2e-5: 0.262 -> 0.246 /
#   0.236 (Dice@20 0.282 -> 0.321 / 0.344); 8e-5: 0.240 / 0.327; myocardium, 100 steps, 8e-5: 0.247 -> 0.178 /
#   0.179; with the encoder trained at 2e-5 (this recipe): mandible 0.262 -> 0.342 / 0.246 (Dice@20 0.282 -> 0.362 /
#   0.330); spinal cord 0.300 -> 0.320 / 0.340 (Dice@20 0.326 -> 0.367 / 0.401).
# FEWSHOT_FAMILY, FEWSHOT_STEPS, FEWSHOT_LR, FEWSHOT_LR_ENCODER ("" freezes the encoder) and FEWSHOT_LOSS_SIZE
# change them.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-export eval demo fewshot bench register}"
CKPT="${CKPT:-runs/mais-small-shared-s4/model.pth}"  # scripts/train_builtin_stage4.sh (stage 4)
LOG="${LOG:-$(dirname "$CKPT")/log.csv}"
VERSION="${VERSION:-0.3.0}"
DTYPE="${DTYPE:-int8}"
PRECISION="${PRECISION:-auto}"
MAX_BYTES="${MAX_BYTES:-25000000}"  # issue 12: <= 25 MB
FAMILY="${FEWSHOT_FAMILY:-Mandible}"
LR_ENCODER="${FEWSHOT_LR_ENCODER-2e-5}"  # set but empty: encoder frozen (the MAIS recipe)
ID=mais-small-shared
OUT=runs/release
FILE="$OUT/$ID.pth"               # the release file, evaluated here and copied into Resources/ by "register"
HALF="$OUT/$ID-float16.pth"       # the same checkpoint stored as float16: the int8 rounding check
REL="Resources/models/$ID.pth"
MAIS=.venv/bin/mais
export MAIS_CACHE_DIR="${MAIS_CACHE_DIR:-$PWD/runs/cache}"
mkdir -p "$OUT" Resources/models
step() { [[ " $STEPS " == *" $1 "* ]]; }
on() { [[ "${!1:-0}" == 1 ]]; }

# PRECISION=auto -> what it means on this CPU (MAISSegmentLib/precision.py), resolved once and recorded for the card
resolve_precision() {
  if [[ ! -f "$OUT/precision.json" ]] || [[ "$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["requested"])' "$OUT/precision.json")" != "$PRECISION" ]]; then
    .venv/bin/python - "$PRECISION" > "$OUT/precision.json" <<'EOF'
import json, sys

import torch

from MAISSegmentLib import precision as p

asked = sys.argv[1]
used = str(p.resolve_precision(asked, torch.device("cpu"))).replace("torch.", "")
speed = p.cpu_bf16_speedup(torch.get_num_threads()) if asked == "auto" else None
native = p.cpu_has_native_bf16() if hasattr(p, "cpu_has_native_bf16") else None  # auto's rule, where it is by flags
out = {"requested": asked, "used": used, "bf16_speedup": speed, "native_bf16": native, "threads": torch.get_num_threads()}
print(json.dumps(out))
EOF
  fi
  USED="$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["used"])' "$OUT/precision.json")"
  echo "inference precision: $PRECISION -> $USED ($OUT/precision.json)"
}

if step export; then
  rm -f "$OUT/demo.txt"  # figures of an earlier export (the test-split JSON records the weights' SHA-256 instead)
  "$MAIS" weights export "$CKPT" --out "$FILE" --dtype "$DTYPE" --id "$ID" --version "$VERSION" | tee "$OUT/export.txt"
  size=$(stat -c %s "$FILE")
  if (( size > MAX_BYTES )); then
    echo "$FILE is $size bytes, over the $MAX_BYTES-byte limit (DTYPE=$DTYPE); export it as int8" >&2
    exit 1
  fi
  if [[ "${FLOAT16_CHECK:-1}" == 1 ]]; then
    "$MAIS" weights export "$CKPT" --out "$HALF" --dtype float16 --id "$ID" --version "$VERSION" | tee -a "$OUT/export.txt"
  fi
fi
if step eval || step demo || step fewshot; then
  resolve_precision
fi
if step eval; then
  METHODS=mais,no-memory,mais-zoom
  if on GROWCUT; then METHODS+=,growcut; fi
  if [[ "${FLOAT16_CHECK:-1}" == 1 ]]; then METHODS+=",ckpt:$HALF"; fi
  METHODS+=,oracle-32,oracle-128
  "$MAIS" evaluate --manifest ../shared/data/manifest.json --split test --methods "$METHODS" --checkpoint "$FILE" \
    --clicks 1,5,10,20 --strategy center --seed 0 --device cpu --precision "$USED" \
    --out "$OUT/test_split.json" | tee "$OUT/test_split.txt"
fi
if step demo; then
  rm -rf "$OUT/demo"
  "$MAIS" demo --checkpoint "$FILE" --clicks 10 --device cpu --precision "$USED" --out "$OUT/demo" 2>&1 \
    | tee "$OUT/demo.txt"
fi
if step fewshot && on FEWSHOT; then
  # mais fewshot has no --precision: MAIS_PRECISION pins the inference of its evaluations (training is unaffected)
  MAIS_PRECISION="$USED" "$MAIS" fewshot --checkpoint "$FILE" --manifest ../shared/data/manifest.json --structures "$FAMILY" \
    --cases 1,3 --steps "${FEWSHOT_STEPS:-60}" --lr-prompt-decoder "${FEWSHOT_LR:-2e-5}" --clicks 1,5,10,20 \
    ${LR_ENCODER:+--lr-encoder "$LR_ENCODER"} \
    --loss-size "${FEWSHOT_LOSS_SIZE:-64}" --cpu-bf16 --device cpu --overwrite \
    --out "$OUT/fewshot_$FAMILY" 2>&1 | tee "$OUT/fewshot_$FAMILY.txt"
fi
if step bench && on BENCH; then
  "$MAIS" bench --preset mais-small-fr --device cpu --threads "${BENCH_THREADS:-2}" --precision "$PRECISION" \
    --json "$OUT/bench.json" | tee "$OUT/bench.txt"
fi
if step register; then
  ARGS=(--weights "$REL" --log "$LOG" --eval "$OUT/test_split.json" --precision "$OUT/precision.json"
    --max-bytes "$MAX_BYTES" --eval-note "${EVAL_NOTE:-}")
  if [[ "${FLOAT16_CHECK:-1}" == 1 ]]; then ARGS+=(--float16-method "ckpt:$HALF"); fi
  if on FEWSHOT; then ARGS+=(--fewshot "$OUT/fewshot_$FAMILY/fewshot.json"); fi
  if on BENCH; then ARGS+=(--bench "$OUT/bench.json"); fi
  if [[ -f "$OUT/demo.txt" ]]; then ARGS+=(--demo "$OUT/demo.txt"); fi
  cp "$FILE" "$REL.tmp" && mv "$REL.tmp" "$REL"
  .venv/bin/python scripts/register_builtin_model.py "${ARGS[@]}"
fi
