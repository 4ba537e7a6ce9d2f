#!/usr/bin/env bash
# Runs the test suite in the project's virtual environment (created on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184
exec .venv/bin/python -m pytest "$@"
