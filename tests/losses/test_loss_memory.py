"""Peak memory of chunked_cross_entropy (forward + backward; chunked_logprobs is the same pass).

B = 8, T = 512, V = 49,152, H = 576, against a full-logits F.cross_entropy. Each case runs in a
fresh process (memory_probe.py) and reports the growth of its peak resident set above its
inputs. The probes run without the shared machine's MALLOC_MMAP_MAX_=0 setting: with mmap
disabled, freed chunks linger in a fragmented heap and the peak RSS measures the allocator,
not the tensors alive at once.
Run with ``pytest -s`` to see the figures.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("memory_probe.py")
ALLOCATOR_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


def _peak_mb_all(cases: list[str]) -> dict[str, float]:
    """Run every probe at once (they are separate processes, so peaks do not mix)."""
    env = {key: value for key, value in os.environ.items() if key not in ALLOCATOR_SETTINGS}
    env["PROBE_THREADS"] = "1"
    running = {
        case: subprocess.Popen([sys.executable, str(PROBE), case], env=env, stdout=subprocess.PIPE, text=True)
        for case in cases
    }
    peaks = {}
    for case, process in running.items():
        stdout, _ = process.communicate(timeout=180)
        assert process.returncode == 0, f"memory probe {case} failed"
        peaks[case] = float(stdout.strip().splitlines()[-1])
    return peaks


@pytest.mark.slow
def test_peak_memory_is_at_most_a_quarter_of_naive():
    operations = ("cross_entropy",)
    peaks = _peak_mb_all([f"{operation}_{kind}" for operation in operations for kind in ("naive", "ours")])
    for operation in operations:
        naive, ours = peaks[f"{operation}_naive"], peaks[f"{operation}_ours"]
        print(f"\n{operation}: naive peak {naive:.0f} MB, ours {ours:.0f} MB ({ours / naive:.1%})")
        assert ours <= naive / 4, f"{operation}: ours {ours:.0f} MB vs naive {naive:.0f} MB"
