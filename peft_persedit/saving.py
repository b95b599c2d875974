"""Atomic adapter saves: every file a ``save_pretrained`` writes lands complete, or the old one stays.

Each file is written to a temporary file in the same folder and then ``os.replace``-d over the target
(atomic on POSIX and Windows). Inside :func:`save_transaction` the renames are deferred to the end, so a save
that fails midway (a full disk, an interrupt, a serialization error) leaves every file of the old adapter as
it was. :func:`install` makes ``PeftModel.save_pretrained`` run as one transaction and peft's
``safe_save_file`` write atomically, for every adapter type (the behaviour is otherwise unchanged).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

_PENDING: ContextVar[list[tuple[str, str]] | None] = ContextVar("persedit_pending_renames", default=None)
_MARK = "__persedit_wrapped__"


def _file_mode(target: str) -> int:
    """Permissions for a new file at ``target``: the old file's, else 0o666 less the umask (as ``open`` would)."""
    try:
        return os.stat(target).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def temp_path(target: str | os.PathLike) -> str:
    """An empty temporary file next to ``target`` (same folder, so ``os.replace`` is atomic)."""
    target = os.fspath(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp",
                               dir=os.path.dirname(target) or ".")
    os.close(fd)
    return tmp


def commit(tmp: str, target: str | os.PathLike) -> None:
    """Flush ``tmp`` to disk and move it over ``target`` (at the end of the open transaction, if any)."""
    target = os.fspath(target)
    os.chmod(tmp, _file_mode(target))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    pending = _PENDING.get()
    if pending is None:
        os.replace(tmp, target)
    else:
        pending.append((tmp, target))


@contextmanager
def save_transaction() -> Iterator[None]:
    """Defer the renames of :func:`commit` until the block ends without error; drop the temp files otherwise."""
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
    """Run ``write(tmp_path)`` and commit the result to ``target``; the temp file is removed if it fails."""
    tmp = temp_path(target)
    try:
        write(tmp)
        commit(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_safe_save_file(tensors: dict[str, torch.Tensor], filename: str | os.PathLike,
                          metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, written to a temp file and committed atomically."""
    write_atomically(lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata), filename)


setattr(atomic_safe_save_file, _MARK, True)


def save_dir_file_atomically(save: Callable[[str], None], directory: str | os.PathLike, name: str) -> None:
    """Commit ``name`` as written by ``save(folder)`` into ``directory``, atomically (``save`` writes a staging
    folder inside ``directory``)."""
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".persedit-save-", dir=directory)
    try:
        save(staging)
        tmp = temp_path(os.path.join(directory, name))
        os.replace(os.path.join(staging, name), tmp)
        try:
            commit(tmp, os.path.join(directory, name))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _transactional(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def save_pretrained(self: Any, *args: Any, **kwargs: Any) -> Any:
        with save_transaction():
            return method(self, *args, **kwargs)

    setattr(save_pretrained, _MARK, True)
    return save_pretrained


def install() -> None:
    """Make peft's adapter saves atomic (idempotent): ``PeftModel.save_pretrained`` commits all its files
    together, and ``peft.peft_model.safe_save_file`` writes through a temp file."""
    import peft.peft_model
    from peft import PeftModel

    if not getattr(peft.peft_model.safe_save_file, _MARK, False):
        peft.peft_model.safe_save_file = atomic_safe_save_file
    if not getattr(PeftModel.save_pretrained, _MARK, False):
        PeftModel.save_pretrained = _transactional(PeftModel.save_pretrained)
