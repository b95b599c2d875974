"""Registers ``PeftType.PERSEDIT`` with peft as soon as peft is imported, without ``import peft_persedit``.

``peft_persedit_hook.pth`` (installed into site-packages with the package) calls :func:`install` at interpreter
start. That only puts a small finder at the front of ``sys.meta_path``: it imports nothing (no torch, no peft)
and does nothing unless ``peft`` is imported. When it is, the finder lets peft's own loader run and then
imports ``peft_persedit``, which registers the adapter type, so ``PeftModel.from_pretrained`` and
``AutoPeftModelForCausalLM.from_pretrained`` load PERSEDIT adapters in any process.
Set ``PEFT_PERSEDIT_NO_AUTOREGISTER=1`` to turn it off.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not ``typing.TYPE_CHECKING``: importing typing at every interpreter start costs ms
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

WATCHED = "peft"
PACKAGE = "peft_persedit"
OPT_OUT = "PEFT_PERSEDIT_NO_AUTOREGISTER"


def register_persedit() -> None:
    """Import ``peft_persedit`` (which registers PERSEDIT); a failure warns instead of breaking ``import peft``."""
    if PACKAGE in sys.modules:  # already imported, or being imported (it imports peft itself)
        return
    try:
        __import__(PACKAGE)
    except Exception as exc:  # noqa: BLE001 - peft must stay importable whatever is wrong with peft_persedit
        import warnings

        warnings.warn(f"peft-persedit: could not register the PERSEDIT adapter type with peft: {exc!r}",
                      ImportWarning, stacklevel=2)


class _RegisteringLoader:
    """Runs peft's own loader, then registers PERSEDIT; puts the real loader back on the module first."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        uninstall()
        register_persedit()


class PeftImportWatcher:
    """A ``sys.meta_path`` finder that answers only for ``peft``, with the spec the other finders give."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != WATCHED:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or isinstance(finder, PeftImportWatcher) or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None

    def invalidate_caches(self) -> None:
        """Nothing cached here (``importlib.invalidate_caches`` calls this on every finder)."""


def uninstall() -> None:
    """Remove every watcher from ``sys.meta_path``."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, PeftImportWatcher)]


def install() -> None:
    """Watch for ``import peft`` (register at once if peft is already imported); idempotent."""
    if os.environ.get(OPT_OUT, "").lower() in ("1", "true", "yes"):
        return
    if WATCHED in sys.modules:
        register_persedit()
    elif not any(isinstance(finder, PeftImportWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, PeftImportWatcher())
