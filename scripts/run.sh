#!/usr/bin/env bash
# Set up the environment and run the main job (the README's main-job command).
# Until the built-in model and demo land (issue 4) the main job is the network benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/mais bench "$@"
