#!/usr/bin/env bash
# Set-up for the benchmarks (idempotent): checks the TRL in .venv and installs the PPO peer.
#   TRL 1.16.0 (SFT, reward model, DPO) is posttrain's dev extra, already in .venv.
#   TRL 1.12.0 (the last release with a PPO trainer) goes into .bench/trl-1.12.0 with
#   --no-deps and is put on PYTHONPATH for the PPO worker only, beside the same torch,
#   transformers and accelerate as everything else.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "setup.sh: $PY missing; run scripts/test.sh (or scripts/setup.sh) first" >&2; exit 1; }

have=$("$PY" -c 'import importlib.metadata as m; print(m.version("trl"))' 2>/dev/null || echo none)
if [ "$have" != "1.16.0" ]; then
    echo "setup.sh: .venv has trl $have; installing trl==1.16.0 (posttrain's dev extra)"
    "$PY" -m pip install --quiet "trl==1.16.0"
fi

target=.bench/trl-1.12.0
if ! PYTHONPATH=$target "$PY" -c 'import trl, sys; sys.exit(trl.__version__ != "1.12.0")' 2>/dev/null; then
    rm -rf "$target"
    mkdir -p .bench
    "$PY" -m pip install --quiet --no-deps --target "$target" "trl==1.12.0"
fi
PYTHONPATH=$target "$PY" -c 'import trl; from trl.experimental.ppo import PPOTrainer; print("trl", trl.__version__, "PPO ok")'
"$PY" -c 'import trl; print("trl", trl.__version__, "(.venv)")'
