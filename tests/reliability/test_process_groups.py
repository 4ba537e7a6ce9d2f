"""Issue 15 §7: a multi-process test gets a free port, a timeout, and a teardown that ends its
whole process group — here the helper is proved on a child that starts a grandchild, and every
test that launches ranks is checked to use it."""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest
from process_groups import process_group, run_group

TESTS = Path(__file__).resolve().parents[1]
# A parent that starts a grandchild sleeping for a minute, prints the grandchild's pid, then waits:
# the shape of a torchrun launcher whose rank waits for a peer.
PARENT = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
          "print(p.pid, flush=True); time.sleep(60)")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed grandchild is re-parented to init and may stay a zombie for a moment.
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split(")")[-1].split()[0] != "Z"


def wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def test_a_timeout_kills_the_grandchild_too(tmp_path):
    log = tmp_path / "pid"
    cmd = [sys.executable, "-c", PARENT.replace("print(p.pid, flush=True)", f"open({str(log)!r}, 'w').write(str(p.pid))")]
    started = time.monotonic()
    with pytest.raises(AssertionError, match="still running after 2 s; its process group was killed"):
        run_group(cmd, timeout=2)
    assert time.monotonic() - started < 30
    assert wait_gone(int(log.read_text()))


def test_a_failed_assert_inside_the_block_kills_the_grandchild():
    with pytest.raises(AssertionError, match="deliberate"):
        with process_group([sys.executable, "-c", PARENT], stdout=-1, text=True) as proc:
            grandchild = int(proc.stdout.readline())
            assert alive(grandchild)
            raise AssertionError("deliberate")
    assert wait_gone(grandchild) and proc.returncode is not None


def test_a_finished_command_returns_its_output_and_code():
    result = run_group([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                       timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")


def test_every_multi_process_test_takes_a_free_port_and_the_group_helper():
    launching = [p for p in TESTS.rglob("test_*.py") if re.search(r"torch\.distributed\.run|torchrun|accelerate launch",
                                                                   p.read_text()) and p.name != Path(__file__).name]
    assert len(launching) >= 5, launching  # sft, rm, dpo, kto, ppo
    for path in launching:
        text = path.read_text()
        assert "--standalone" in text, f"{path.name}: torchrun without --standalone (a fixed port can collide)"
        assert not re.search(r"MASTER_PORT|master[-_]port|\b29[0-9]{3}\b", text), f"{path.name}: hard-coded port"
        assert "subprocess.run(" not in text and "subprocess.Popen(" not in text, \
            f"{path.name}: launches a process without process_groups (its ranks could outlive the test)"


def test_a_grandchild_in_a_session_of_its_own_is_killed_too():
    """torchrun starts its ranks with setsid: the group kill misses them, the marker does not."""
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
            "time.sleep(600)")
    start = time.monotonic()
    with pytest.raises(AssertionError, match="still running after 2"):
        run_group([sys.executable, "-c", code], timeout=2)
    assert time.monotonic() - start < 30   # the pipe reader was not left waiting on the orphan
