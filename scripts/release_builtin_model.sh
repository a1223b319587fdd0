#!/usr/bin/env bash
# Release the built-in model: export the training checkpoint of scripts/train_builtin_model.sh as the bundled
# float16 weight file, then measure the model card's figures on the exported file (not on the training
# checkpoint): the full test split (MAIS / no memory / Grow from seeds at 1, 5, 10, 20 clicks) and the
# few-shot curve (fine-tuning on 1 and 3 training cases of the myocardium (ACDC "Myo"), the weakest family before fine-tuning
# among those with training cases; FEWSHOT_FAMILY=Parotid picks another).
#   bash scripts/release_builtin_model.sh            # all four steps
#   STEPS="eval" bash scripts/release_builtin_model.sh   # only some of: export eval fewshot register
# Results go to runs/release/ (not committed); "register" adds the file to Resources/models.json as the default and
# writes its card Resources/models/mais-small-shared.md (from scripts/model_card_template.md) with those figures.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-export eval fewshot register}"
CKPT="${CKPT:-runs/mais-small-shared/last.pth}"
REL=Resources/models/mais-small-shared.pth
OUT=runs/release
export MAIS_CACHE_DIR="${MAIS_CACHE_DIR:-$PWD/runs/cache}"
mkdir -p "$OUT" Resources/models
if [[ " $STEPS " == *" export "* ]]; then
  .venv/bin/mais weights export "$CKPT" --out "$REL" --dtype float16 --version "${VERSION:-0.1.0}" | tee "$OUT/export.txt"
fi
if [[ " $STEPS " == *" eval "* ]]; then
  .venv/bin/mais evaluate --manifest ../shared/data/manifest.json --split test \
    --methods mais,no-memory,growcut --checkpoint "$REL" --clicks 1,5,10,20 --strategy center --seed 0 \
    --device cpu --out "$OUT/test_split.json" | tee "$OUT/test_split.txt"
fi
if [[ " $STEPS " == *" fewshot "* ]]; then
  .venv/bin/mais fewshot --checkpoint "$REL" --manifest ../shared/data/manifest.json --structures "${FEWSHOT_FAMILY:-Myo}" \
    --cases 1,3 --steps "${FEWSHOT_STEPS:-100}" --clicks 1,5,10,20 --loss-size 32 --cpu-bf16 --device cpu \
    --out "$OUT/fewshot_${FEWSHOT_FAMILY:-Myo}" 2>&1 | tee "$OUT/fewshot_${FEWSHOT_FAMILY:-Myo}.txt"
fi
if [[ " $STEPS " == *" register "* ]]; then
  .venv/bin/python scripts/register_builtin_model.py --weights "$REL" --log runs/mais-small-shared/log.csv \
    --eval "$OUT/test_split.json" --fewshot "$OUT/fewshot_${FEWSHOT_FAMILY:-Myo}/fewshot.json"
fi
