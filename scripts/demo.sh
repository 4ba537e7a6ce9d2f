#!/usr/bin/env bash
# The main job on the embedded default model (see README): recipes/quickstart.yaml, from
# instruction data to report.html. Extra flags go to `posttrain run` (--dry-run, --from STAGE).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The allocator (scripts/allocator.sh): tcmalloc where setup.sh could install it, else glibc settings.
source scripts/allocator.sh
exec .venv/bin/posttrain run recipes/quickstart.yaml "$@"
