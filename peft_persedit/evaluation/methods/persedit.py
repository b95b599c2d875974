"""persedit: gated, clustered edits — default :class:`PersonalizationEditConfig`, every user an adapter,
all users edited in ONE :meth:`PersonalizationEditor.edit_users` call (batched values, per-cluster solves)."""

from __future__ import annotations

from contextlib import AbstractContextManager

from peft import get_peft_model

from ...config import PersonalizationEditConfig
from ...editing import PersonalizationEditor, shifted_thresholds
from .method import AdapterMethod, Users


class PersEdit(AdapterMethod):
    name = "persedit"
    edit_config: dict = {}  # PersonalizationEditConfig fields (subclasses change them)
    edit_method = "rome"  # PersonalizationEditor.edit_users(method=...)
    gate_sweep = True

    def personalize(self, users: Users) -> None:
        self.model = get_peft_model(self.model, PersonalizationEditConfig(**self.edit_config),
                                    adapter_name="template").eval()
        editor = PersonalizationEditor(self.model, self.tokenizer, adapter_name="template",
                                       progress=self.config.progress)
        report = editor.edit_users(users, verify=False, method=self.edit_method)
        self.info["stage_seconds"] = {k: round(v, 3) for k, v in report.timings.items()}

    def shifted_gates(self, offset: float) -> AbstractContextManager:
        """Every user's gate thresholds τ_c ← τ_c + ``offset`` (:func:`~peft_persedit.editing.shifted_thresholds`)."""
        return shifted_thresholds(self.model, offset)
