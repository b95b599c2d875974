"""peft-persedit: LLM personalization as model editing, shipped as the PEFT adapter type ``PERSEDIT``.

Importing this package registers ``PeftType.PERSEDIT`` with peft (idempotent). An installed package also does
that whenever peft is imported (``peft_persedit_hook.pth``), so peft's loaders work without this import.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any


def _map_source_tree_kernels() -> None:
    """Import ``peft_persedit.kernels`` from the top-level ``kernels/`` of a source tree that is not installed.

    Installs map it there themselves (pyproject's ``package-dir``); a checkout used through ``PYTHONPATH``, or
    a copy whose editable install points elsewhere, gets the same mapping here.
    """
    name = f"{__name__}.kernels"
    folder = Path(__file__).resolve().parent.parent / "kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    if not ((folder / "__init__.py").exists() and (folder.parent / "pyproject.toml").exists()):
        return  # not a source tree: let the import fail where the kernels are used
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    globals()["kernels"] = module  # what the import system does for a submodule it loads itself


_map_source_tree_kernels()

from .config import PersonalizationEditConfig  # noqa: E402
from .layer import PersEditLayer, PersEditLinear  # noqa: E402
from .loading import from_pretrained  # noqa: E402
from .model import PersEditModel  # noqa: E402
from .peft_type import NAME, PERSEDIT, PREFIX  # noqa: E402

__all__ = [
    "PERSEDIT",
    "PersEditLayer",
    "PersEditLinear",
    "PersEditModel",
    "PersonalizationEditConfig",
    "PersonalizationEditor",
    "Preference",
    "from_pretrained",
    "load_default_model",
    "load_preferences",
]

_LAZY = {  # name: submodule that defines it (imported on first access: the editing engine is heavier)
    "load_default_model": "default_model",
    "DEFAULT_MODEL_NAME": "default_model",
    "PersonalizationEditor": "editing",
    "Preference": "preferences",
    "load_preferences": "preferences",
    "group_users": "groups",
    "build_group_adapters": "groups",
    "load_group_adapters": "groups",
    "dpl_context": "groups",
}


def __getattr__(name: str) -> Any:
    """Lazily expose the heavier parts (default model, editing engine, preferences, groups)."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'peft_persedit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def register() -> None:
    """Register config and tuner classes for ``PeftType.PERSEDIT`` with peft (no-op when already done).

    Also installs, idempotently: atomic adapter saves (:mod:`.saving`), load errors that name the file
    (:mod:`.validation`) and private-by-default pushes of adapters holding preferences (:mod:`.privacy`).
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from . import privacy, saving, validation

    for extension in (saving, validation, privacy):
        extension.install()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(PERSEDIT) is PersEditModel:
        return
    if PERSEDIT in PEFT_TYPE_TO_TUNER_MAPPING:  # registered by an earlier (reloaded) copy of this package
        PEFT_TYPE_TO_CONFIG_MAPPING[PERSEDIT] = PersonalizationEditConfig
        PEFT_TYPE_TO_TUNER_MAPPING[PERSEDIT] = PersEditModel
        return
    register_peft_method(name=NAME, config_cls=PersonalizationEditConfig, model_cls=PersEditModel, prefix=PREFIX)


register()
