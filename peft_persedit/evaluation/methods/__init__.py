"""The compared methods, by name: base, ice, lora, rome, persedit, representation, dpl (one module each)."""

from __future__ import annotations

from ..config import EvalConfig
from .dpl import DPL
from .ice import ICE
from .lora import LoRA
from .method import AdapterMethod, Method, Route
from .persedit import PersEdit
from .representation import Representation
from .rome import ROME

REGISTRY: dict[str, type[Method]] = {"base": Method, "ice": ICE, "lora": LoRA, "rome": ROME, "persedit": PersEdit,
                                     "representation": Representation, "dpl": DPL}

__all__ = ["DPL", "ICE", "REGISTRY", "ROME", "AdapterMethod", "LoRA", "Method", "PersEdit", "Representation", "Route",
           "build_method"]


def build_method(name: str, config: EvalConfig) -> Method:
    """A fresh method instance (loads its own copy of the base model)."""
    return REGISTRY[name](config)
