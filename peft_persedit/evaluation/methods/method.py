"""The interface every compared method implements: personalize users, then route each row.

A method owns a fresh copy of the base model. ``personalize(users)`` writes every user's preferences
(into weights, adapters or a prompt); afterwards row r of a batch for user u is generated with
``route(u)`` — an adapter name for PeftModels (``"__base__"`` = unpersonalized) and/or a system prompt.
``route(None)`` is the method's unpersonalized reference, against which locality is measured. Methods with
gate thresholds (``gate_sweep = True``) also give :meth:`Method.shifted_gates`, a context in which every
threshold is moved by an offset (the harness's gate-threshold sweep).
"""

from __future__ import annotations

import gc
import tempfile
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...default_model import load_default_model
from ...peft_type import BASE_ADAPTER
from ...preferences import Preference
from ..config import EvalConfig

Users = dict[str, list[Preference]]


@dataclass(frozen=True)
class Route:
    adapter: str | None = None  # row's adapter (PeftModels only)
    system: str | None = None  # system prompt (None: the chat template's default)


class Method:
    """No personalization at all (subclasses override :meth:`personalize` / :meth:`route`)."""

    name = "base"
    routed = False  # rows carry adapter names (the model is a PeftModel)
    gate_sweep = False  # has gate thresholds that :meth:`shifted_gates` can move

    def __init__(self, config: EvalConfig) -> None:
        self.config = config
        self.model, self.tokenizer = load_default_model(config.model, device=config.device)
        self.info: dict[str, Any] = {}  # method-specific cost details (steps, loss, stage timings)

    def personalize(self, users: Users) -> None:
        """Write every user's preferences (the base model keeps nothing)."""

    def route(self, user: str | None) -> Route:
        return Route()

    def adapter_bytes(self, user: str) -> int:
        """Bytes on disk of what personalizes ``user``."""
        return 0

    def shifted_gates(self, offset: float) -> AbstractContextManager:
        """A context in which every gate threshold is τ + ``offset`` (only where ``gate_sweep`` is true)."""
        raise NotImplementedError(f"method {self.name!r} has no gate thresholds to shift")

    def close(self) -> None:
        """Drop the model (the next method loads its own copy)."""
        self.model = None
        gc.collect()


class AdapterMethod(Method):
    """A method whose users are adapters of one PeftModel (``self.model``), served in mixed batches."""

    routed = True

    def route(self, user: str | None) -> Route:
        return Route(adapter=user or BASE_ADAPTER)

    def adapter_bytes(self, user: str) -> int:
        """Size of ``save_pretrained(selected_adapters=[user])``: adapter config + weights."""
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp, selected_adapters=[user])
            return sum(f.stat().st_size for f in Path(tmp).rglob("adapter_*") if f.is_file())
