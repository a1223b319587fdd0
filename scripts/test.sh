#!/usr/bin/env bash
# Set up the environment and run the whole test suite (the README's test command; CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check MAISSegmentLib MAISSegment Testing
.venv/bin/ruff format --check MAISSegmentLib MAISSegment Testing
.venv/bin/python -m pytest Testing "$@"
