"""Atomic writes: a file or folder appears complete at its final path, or not at all (the old one stays).

Every writer in the package goes through here. The content is written to a temporary sibling of the target
(same folder, so the rename is atomic on POSIX and Windows) named ``.<name>.<pid>.<random>.tmp``, which is
renamed over the target on success and deleted on failure. A replaced file keeps its permissions; a new one
gets those of any file ``open`` creates.
"""

from __future__ import annotations

import glob
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

Replace = Callable[[Path, Path], None]


def temp_sibling(final: str | os.PathLike) -> Path:
    """A fresh temporary path next to ``final`` (nothing is created)."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def remove_stale_temps(final: str | os.PathLike, min_age_s: float = 3600.0) -> None:
    """Delete temp siblings of ``final`` left by killed processes (dead pid and older than ``min_age_s``)."""
    final = Path(final)
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


def _keep_mode(tmp: Path, final: Path) -> None:
    """Give ``tmp`` the permissions of the file it is about to replace (nothing if there is none)."""
    try:
        mode = os.stat(final).st_mode & 0o777
    except FileNotFoundError:
        return
    os.chmod(tmp, mode)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_file(final: str | os.PathLike, *, durable: bool = False, replace: Replace = os.replace) -> Iterator[Path]:
    """Yield a temporary sibling path of ``final`` to write; on success it replaces ``final`` atomically.

    ``durable``: flush the file to disk before the rename. ``replace(tmp, final)`` does the rename (a caller
    may defer it; the temp file is then its to move or delete). On an exception the temp file is deleted.
    """
    final = Path(final)
    tmp = temp_sibling(final)
    try:
        yield tmp
        _keep_mode(tmp, final)
        if durable:
            _fsync(tmp)
        replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_file`."""
    with atomic_file(path, durable=durable) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def move_into_place(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Rename the finished file ``src`` over ``dest`` (same filesystem), keeping ``dest``'s permissions."""
    _keep_mode(Path(src), Path(dest))
    os.replace(src, dest)


@contextmanager
def staging_dir(near: str | os.PathLike) -> Iterator[Path]:
    """A new temporary folder next to ``near`` (its parent is created), deleted with its contents at the end."""
    tmp = temp_sibling(near)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()  # unlike mkdtemp (0700), this gets the permissions of any normal mkdir
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``final`` to fill; rename it to ``final`` on success.

    On an exception the temporary dir is deleted and ``final`` is left untouched. If ``final`` already exists
    when the block ends (another process won the race), the new copy is discarded and ``final`` kept.
    Temp folders of killed processes next to ``final`` are removed first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    with staging_dir(final) as tmp:
        yield tmp
        try:
            os.rename(tmp, final)  # atomic; fails if final is a non-empty dir
        except OSError:
            if not final.exists():
                raise  # otherwise another process won the race: keep its copy, drop ours
