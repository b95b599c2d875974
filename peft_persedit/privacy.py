"""Pushing an adapter that holds preferences creates a private Hub repo unless the caller says otherwise.

A PERSEDIT adapter's ``adapter_config.json`` lists the preferences it was made from, in plain text (subject,
question, target, …), so that edits are reproducible and ``persedit show`` can say what an adapter holds.
``push_to_hub`` uploads that file. :func:`install` wraps ``push_to_hub`` of ``PeftModel`` and of transformers'
``PreTrainedModel`` (which can carry adapters too): when a PERSEDIT adapter with preferences is pushed and the
caller did not pass ``private``, the repo is created private, with a warning saying what is uploaded.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

_MARK = "__persedit_wrapped__"


def adapters_with_preferences(model: Any) -> dict[str, int]:
    """Adapter name → number of preferences, for the PERSEDIT adapters of ``model`` that hold any."""
    from .config import PersonalizationEditConfig

    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return {}
    return {name: len(config.preferences) for name, config in configs.items()
            if isinstance(config, PersonalizationEditConfig) and config.preferences}


def _private_by_default(method: Any) -> Any:
    signature = inspect.signature(method)

    @functools.wraps(method)
    def push_to_hub(self: Any, *args: Any, **kwargs: Any) -> Any:
        held = adapters_with_preferences(self)
        if not held:
            return method(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        what = ", ".join(f"{name!r} ({n} preference{'s' * (n != 1)})" for name, n in held.items())
        stored = (f"adapter(s) {what} store their preferences in plain text in adapter_config.json (field "
                  "'preferences': subjects, questions, targets, source texts)")
        if bound.arguments.get("private") is None:
            bound.arguments["private"] = True
            warnings.warn(f"push_to_hub: {stored}; creating the repo as PRIVATE. Pass private=False to publish them "
                          "(an existing repo keeps its visibility).", UserWarning, stacklevel=2)
        elif not bound.arguments["private"]:
            warnings.warn(f"push_to_hub(private=False): {stored}, which will be public.", UserWarning, stacklevel=2)
        return method(*bound.args, **bound.kwargs)

    setattr(push_to_hub, _MARK, True)
    return push_to_hub


def install() -> None:
    """Wrap ``push_to_hub`` of ``PeftModel`` and ``PreTrainedModel`` (idempotent; other models are untouched)."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    for cls in (PeftModel, PreTrainedModel):
        if not getattr(cls.push_to_hub, _MARK, False):
            cls.push_to_hub = _private_by_default(cls.push_to_hub)
