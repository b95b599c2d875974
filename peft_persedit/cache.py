"""The project's user cache directory and atomic directory creation."""

from __future__ import annotations

import glob
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import platformdirs

CACHE_ENV = "PERSEDIT_CACHE"


def cache_dir(*parts: str) -> Path:
    """``$PERSEDIT_CACHE`` or the platform's user cache dir for peft-persedit, joined with ``parts`` (created)."""
    root = Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("peft-persedit")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _remove_stale_temps(final: Path, min_age_s: float = 3600.0) -> None:
    """Delete temp siblings of ``final`` left by killed processes (dead pid and older than ``min_age_s``)."""
    for tmp in final.parent.glob(f".{glob.escape(final.name)}.*.*.tmp"):
        try:
            pid = int(tmp.name[len(final.name) + 2:].split(".")[0])
            if time.time() - tmp.stat().st_mtime < min_age_s:
                continue
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, OSError):
            continue


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` (same filesystem) to fill; rename it to ``final`` on success.

    On an exception the temporary dir is deleted and ``final`` is left untouched. If ``final`` already exists
    when the block ends (another process won the race), the new copy is discarded and ``final`` kept.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()  # unlike mkdtemp (0700), this gets the permissions of any normal mkdir
    try:
        yield tmp
        try:
            os.rename(tmp, final)  # atomic; fails if final is a non-empty dir
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
