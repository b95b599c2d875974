"""Atomic adapter saves: every file a ``save_pretrained`` writes lands complete, or the old one stays.

Each file is written through :func:`.atomic.atomic_file`: a temporary file in the same folder, flushed and
``os.replace``-d over the target (a replaced file keeps its permissions). Inside :func:`save_transaction` the
renames are deferred to the end, so a save that fails midway (a full disk, an interrupt, a serialization error)
leaves every file of the old adapter as it was. :func:`install` makes ``PeftModel.save_pretrained`` run as one
transaction and peft's ``safe_save_file`` write atomically, for every adapter type (the behaviour is otherwise
unchanged).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from .atomic import atomic_file, staging_dir
from .patching import wrap_once

_PENDING: ContextVar[list[tuple[str, str]] | None] = ContextVar("persedit_pending_renames", default=None)


def _replace_or_defer(tmp: Path, target: Path) -> None:
    """``os.replace(tmp, target)`` now, or at the end of the open :func:`save_transaction`."""
    pending = _PENDING.get()
    if pending is None:
        os.replace(tmp, target)
    else:
        pending.append((str(tmp), str(target)))


@contextmanager
def save_transaction() -> Iterator[None]:
    """Defer the renames of :func:`write_atomically` until the block ends without error; else drop the temp files."""
    if _PENDING.get() is not None:  # nested: the outer transaction commits
        yield
        return
    pending: list[tuple[str, str]] = []
    token = _PENDING.set(pending)
    try:
        yield
    except BaseException:
        for tmp, _ in pending:
            Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _PENDING.reset(token)
    for tmp, target in pending:
        os.replace(tmp, target)


def write_atomically(write: Callable[[str], Any], target: str | os.PathLike) -> None:
    """Run ``write(tmp_path)`` and commit the result to ``target`` (flushed to disk; renamed at the end of the
    open transaction, if any); the temp file is removed if it fails."""
    with atomic_file(target, durable=True, replace=_replace_or_defer) as tmp:
        write(str(tmp))


def atomic_safe_save_file(tensors: dict[str, torch.Tensor], filename: str | os.PathLike,
                          metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, written to a temp file and committed atomically."""
    write_atomically(lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata), filename)


def save_dir_file_atomically(save: Callable[[str], None], directory: str | os.PathLike, name: str) -> None:
    """Commit ``name`` as written by ``save(folder)`` into ``directory``, atomically (``save`` writes a staging
    folder inside ``directory``)."""
    target = Path(directory) / name
    with staging_dir(target) as staging:
        save(str(staging))
        write_atomically(lambda tmp: os.replace(staging / name, tmp), target)


def _transactional(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def save_pretrained(self: Any, *args: Any, **kwargs: Any) -> Any:
        with save_transaction():
            return method(self, *args, **kwargs)

    return save_pretrained


def install() -> None:
    """Make peft's adapter saves atomic (idempotent): ``PeftModel.save_pretrained`` commits all its files
    together, and ``peft.peft_model.safe_save_file`` writes through a temp file."""
    import peft.peft_model
    from peft import PeftModel

    wrap_once(peft.peft_model, "safe_save_file", lambda _original: atomic_safe_save_file)
    wrap_once(PeftModel, "save_pretrained", _transactional)
