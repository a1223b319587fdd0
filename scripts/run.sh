#!/usr/bin/env bash
# Set up the environment and run the main job (the README's main-job command): `mais demo` with the built-in
# default model (Resources/models/) on the bundled sample CT (Resources/sample/). Extra arguments go to
# `mais demo` (e.g. --structure spleen --clicks 20 --out out/spleen).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/mais demo --out out/demo --device "${MAIS_DEVICE:-auto}" "$@"
