"""The project's user cache: where it lives, self-repair of unreadable entries, bounded size.

Location: ``$PERSEDIT_CACHE`` if set, else the platform's user cache dir (``~/.cache/peft-persedit`` on Linux).
Contents, all keyed by content (never by a path, so venvs and checkouts share them):

* ``models/SmolLM2-135M-Instruct-<key>`` — the embedded model converted to a plain HF folder (~520 MB), keyed
  by the GGUF's sha256, the conversion version and the transformers major version; two are kept.
* ``stats-v3/<fingerprint>`` — per model and edit layer, μ, C and a sample of layer inputs (~20 MB per layer);
  ``selftext/<fingerprint>`` — the model's self-generated neutral text (~25 KB). The 8 most recently used
  models are kept.

Entries are written atomically (:mod:`.atomic`). An unreadable entry is reported once with a warning naming
the file, deleted and rebuilt.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import platformdirs

CACHE_ENV = "PERSEDIT_CACHE"
#: Folders earlier versions wrote into the cache root (pruned when their successors are written).
LEGACY_DIRS = ("stats-v2",)
T = TypeVar("T")


class CacheWarning(UserWarning):
    """A cache entry was unreadable (and is rebuilt)."""


def cache_dir(*parts: str) -> Path:
    """``$PERSEDIT_CACHE`` or the platform's user cache dir for peft-persedit, joined with ``parts`` (created)."""
    root = Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("peft-persedit")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_cached(path: str | os.PathLike, read: Callable[[Path], T]) -> T | None:
    """``read(path)``; ``None`` if ``path`` does not exist. If it exists but ``read`` fails (corrupt, truncated,
    wrong content), warn once naming the file, delete it and return ``None`` so that the caller rebuilds it."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return read(path)
    except Exception as err:  # any failure to read a cache entry means: rebuild it
        warnings.warn(f"unreadable cache entry {path} ({type(err).__name__}: {str(err)[:200]}); deleting and "
                      "recomputing it", CacheWarning, stacklevel=2)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return None


def touch(path: str | os.PathLike) -> None:
    """Mark a cache entry as just used (its mtime orders :func:`prune`)."""
    try:
        os.utime(path)
    except OSError:
        pass


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile by another process
        return 0.0


def prune(keep: str | os.PathLike, pattern: str, max_entries: int = 1) -> list[Path]:
    """Delete the siblings of ``keep`` whose names fully match the regex ``pattern``, except ``keep`` and the
    ``max_entries - 1`` most recently used others. Nothing else is touched. Returns what was deleted."""
    keep = Path(keep)
    others = [p for p in keep.parent.iterdir() if p.name != keep.name and re.fullmatch(pattern, p.name)]
    others.sort(key=_mtime, reverse=True)
    doomed = others[max(0, max_entries - 1):]
    for path in doomed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return doomed


def prune_legacy() -> None:
    """Delete the cache folders of earlier versions (:data:`LEGACY_DIRS`) from the cache root."""
    root = cache_dir()
    for name in LEGACY_DIRS:
        if (root / name).is_dir():
            shutil.rmtree(root / name, ignore_errors=True)
