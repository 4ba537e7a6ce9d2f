"""Where built-in models live on disk, and how a cache folder is written exactly once."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

CACHE_ENV = "POSTTRAIN_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: `cache_dir` if given, else `$POSTTRAIN_CACHE`, else ~/.cache/posttrain."""
    if cache_dir is not None:
        root, what = Path(cache_dir).expanduser(), f"cache folder {str(cache_dir)!r}"
    elif os.environ.get(CACHE_ENV):
        root, what = Path(os.environ[CACHE_ENV]).expanduser(), f"{CACHE_ENV}={os.environ[CACHE_ENV]!r}"
    else:
        root, what = Path.home() / ".cache" / "posttrain", "the cache folder ~/.cache/posttrain"
    if root.exists() and not root.is_dir():
        raise ValueError(f"{what} is a file; the cache must be a folder (set {CACHE_ENV} to another path)")
    return root


def build_once(name: str, write: Callable[[Path], None], cache_dir: str | os.PathLike | None = None) -> Path:
    """Return `<cache root>/<name>`, calling `write(tmp_folder)` first if the folder is absent.

    `write` fills a fresh temporary folder beside the target, which is then renamed into place,
    so a reader never sees a half-written folder (a crash mid-write leaves only a `.tmp-*`
    folder) and two processes racing on a cold cache both end up with one complete copy.
    """
    final = cache_root(cache_dir) / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=final.parent))
    try:
        write(tmp)
        os.rename(tmp, final)
    except OSError:
        # rename onto an existing non-empty folder fails: another process finished first.
        if not final.is_dir():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
