"""Child processes that cannot outlive their test.

Each command starts in a session of its own, so the process and everything it starts (torchrun's
ranks, a trainer's workers) share one process group; on the way out, passed or failed, the whole
group is killed. `subprocess.run(..., timeout=)` alone kills only the direct child: a torchrun
launcher dies and its ranks stay, one of them waiting for a peer that never comes.

The group is not enough by itself: torchrun starts each rank in a session of its own, so a rank
whose launcher was killed leaves the group, keeps the test's pipes open and blocks its reads.
Every command therefore also carries a marker in its environment, inherited by everything it
starts, and teardown kills every process that holds the marker (read from /proc).
"""
from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path
from collections.abc import Iterator
from contextlib import contextmanager


MARKER = "POSTTRAIN_TEST_PROCESS"


def marked(popen_kwargs: dict) -> tuple[str, dict]:
    """(a new marker, popen_kwargs whose env carries it)."""
    marker = uuid.uuid4().hex
    env = dict(popen_kwargs.get("env") or os.environ)
    env[MARKER] = marker
    return marker, {**popen_kwargs, "env": env}


def kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment holds MARKER=marker (a rank that left the group)."""
    needle = f"{MARKER}={marker}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ValueError):   # gone already, or not ours to read
                pass


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process in `proc`'s group (started with start_new_session=True) and every
    process carrying its marker, then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group has already emptied
        pass
    if getattr(proc, "marker", None):
        kill_marked(proc.marker)
    proc.wait()


@contextmanager
def process_group(cmd: list[str], **popen_kwargs) -> Iterator[subprocess.Popen]:
    """Popen(cmd) in a new session; its whole process group is killed when the block exits."""
    marker, popen_kwargs = marked(popen_kwargs)
    proc = subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)
    proc.marker = marker
    with proc:
        try:
            yield proc
        finally:
            kill_group(proc)


def run_group(cmd: list[str], *, timeout: float, **popen_kwargs) -> subprocess.CompletedProcess:
    """Like subprocess.run(cmd, capture_output=True, text=True, timeout=timeout), but a command
    still running after `timeout` seconds has its whole process group killed, and the test fails
    with the tail of what it printed."""
    with process_group(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            stdout, stderr = proc.communicate()
            raise AssertionError(f"{' '.join(map(str, cmd[:6]))} … still running after {timeout} s; its process "
                                 f"group was killed\n{stdout[-2000:]}{stderr[-2000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def spawner() -> Iterator:
    """Body of the `spawn` fixture: yields `start(cmd, **popen_kwargs) -> Popen` (each process in a
    new session) and at teardown kills every started process's group and closes its pipes."""
    started: list[subprocess.Popen] = []

    def start(cmd: list[str], **popen_kwargs) -> subprocess.Popen:
        marker, kwargs = marked(popen_kwargs)
        started.append(subprocess.Popen(cmd, start_new_session=True, **kwargs))
        started[-1].marker = marker
        return started[-1]

    yield start
    for proc in started:
        with proc:
            kill_group(proc)
