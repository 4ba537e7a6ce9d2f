"""scripts/: what demo.sh sources must survive its `set -euo pipefail`. An awk that exited at its
first match killed ldconfig with SIGPIPE, and pipefail made that the script's exit (141) in 4 of 5
tries here; whether it happens depends on timing, so a stand-in ldconfig makes it certain: its
match comes first, followed by far more than a pipe buffer (64 KiB) of other libraries."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY = "/opt/fake/libtcmalloc_minimal.so.4"


def allocator_env(tmp_path: Path, listing: str) -> dict:
    """The environment demo.sh would run scripts/allocator.sh in, with ldconfig printing `listing` first."""
    fake = tmp_path / "ldconfig"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' '{listing}'\n"
                    "i=0; while [ $i -lt 4000 ]; do echo '\tlibother$i.so.1 (libc6,x86-64) => /lib/libother.so.1'; "
                    "i=$((i + 1)); done\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
    return {**env, "PATH": f"{tmp_path}{os.pathsep}{env['PATH']}"}


def source_allocator(env: dict) -> tuple[str, str]:
    result = subprocess.run(["bash", "-c", 'set -euo pipefail; source scripts/allocator.sh; '
                             'echo "${LD_PRELOAD:-}|${MALLOC_MMAP_MAX_:-}"'],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (result.returncode, result.stderr)
    preload, mmap_max = result.stdout.strip().split("|")
    return preload, mmap_max


def test_tcmalloc_is_preloaded_when_ldconfig_lists_it_first_of_many(tmp_path):
    listing = f"\tlibtcmalloc_minimal.so.4 (libc6,x86-64) => {LIBRARY}"
    assert source_allocator(allocator_env(tmp_path, listing)) == (LIBRARY, "")


def test_glibc_settings_when_tcmalloc_is_missing(tmp_path):
    listing = "\tlibc.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libc.so.6"
    assert source_allocator(allocator_env(tmp_path, listing)) == ("", "0")
