"""peft-persedit: LLM personalization as model editing, shipped as the PEFT adapter type ``PERSEDIT``.

Importing this package registers ``PeftType.PERSEDIT`` with peft (idempotent).
"""

from __future__ import annotations

from .config import PersonalizationEditConfig
from .layer import PersEditLayer, PersEditLinear
from .loading import from_pretrained
from .model import PersEditModel
from .registration import PERSEDIT, register

register()

__all__ = [
    "PERSEDIT",
    "PersEditLayer",
    "PersEditLinear",
    "PersEditModel",
    "PersonalizationEditConfig",
    "from_pretrained",
    "load_default_model",
]


def __getattr__(name: str):
    """Lazily expose the heavier parts (default model, editing engine, preferences)."""
    if name in ("load_default_model", "DEFAULT_MODEL_NAME"):
        from . import default_model

        return getattr(default_model, name)
    if name in ("group_users", "build_group_adapters", "load_group_adapters", "dpl_context"):
        from . import groups

        return getattr(groups, name)
    raise AttributeError(f"module 'peft_persedit' has no attribute {name!r}")
