"""Wrapping a function of peft or transformers once (what :mod:`.saving`, :mod:`.validation` and :mod:`.privacy`
install when the package registers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_MARK = "__persedit_wrapped__"


def wrap_once(owner: Any, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """``owner.name = wrap(owner.name)``, unless ``owner.name`` already is one of our wrappers (idempotent, also
    when the package is imported again or reloaded)."""
    current = getattr(owner, name)
    if getattr(current, _MARK, False):
        return
    wrapped = wrap(current)
    setattr(wrapped, _MARK, True)
    setattr(owner, name, wrapped)
