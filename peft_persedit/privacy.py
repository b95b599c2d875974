"""Pushing an adapter that holds preferences creates a private Hub repo unless the caller says otherwise.

A PERSEDIT adapter's ``adapter_config.json`` lists the preferences it was made from, in plain text (subject,
question, target, …), so that edits are reproducible and ``persedit show`` can say what an adapter holds.
``push_to_hub`` uploads that file. :func:`install` wraps ``push_to_hub`` of ``PeftModel`` and of transformers'
``PreTrainedModel`` (which can carry adapters too; also its ``save_pretrained(push_to_hub=True)``): when a
PERSEDIT adapter with preferences is pushed and the caller did not pass ``private``, the repo is created
private, with a warning saying what is uploaded.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

from .patching import wrap_once


def adapters_with_preferences(model: Any) -> dict[str, int]:
    """Adapter name → number of preferences, for the PERSEDIT adapters of ``model`` that hold any."""
    from .config import PersonalizationEditConfig

    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return {}
    return {name: len(config.preferences) for name, config in configs.items()
            if isinstance(config, PersonalizationEditConfig) and config.preferences}


def effective_private(model: Any, private: bool | None, stacklevel: int = 3) -> bool | None:
    """The ``private`` flag to push ``model`` with: ``True`` when it holds preferences and ``private`` is None
    (with a warning saying what is uploaded); a warning too when such a model is pushed with ``private=False``."""
    held = adapters_with_preferences(model)
    if not held:
        return private
    what = ", ".join(f"{name!r} ({n} preference{'s' * (n != 1)})" for name, n in held.items())
    stored = (f"adapter(s) {what} store their preferences in plain text in adapter_config.json (field "
              "'preferences': subjects, questions, targets, source texts)")
    if private is None:
        warnings.warn(f"push_to_hub: {stored}; creating the repo as PRIVATE. Pass private=False to publish them "
                      "(an existing repo keeps its visibility).", UserWarning, stacklevel=stacklevel)
        return True
    if not private:
        warnings.warn(f"push_to_hub(private=False): {stored}, which will be public.", UserWarning,
                      stacklevel=stacklevel)
    return private


def _wrap(method: Any) -> Any:
    """``push_to_hub(..., private=None)`` or ``save_pretrained(..., push_to_hub=True, **kwargs)`` with the
    ``private`` flag of :func:`effective_private`."""
    signature = inspect.signature(method)
    pushes = "push_to_hub" not in signature.parameters  # push_to_hub itself, else save_pretrained(push_to_hub=)

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not adapters_with_preferences(self):
            return method(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        if pushes:
            bound.arguments["private"] = effective_private(self, bound.arguments.get("private"))
        elif bound.arguments.get("push_to_hub"):
            extra = bound.arguments.setdefault("kwargs", {})
            extra["private"] = effective_private(self, extra.get("private"))
        return method(*bound.args, **bound.kwargs)

    return wrapper


def install() -> None:
    """Wrap ``push_to_hub`` of ``PeftModel`` and ``PreTrainedModel``, and ``PreTrainedModel.save_pretrained``
    (which pushes with ``push_to_hub=True``); idempotent; models without such adapters are untouched."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    for cls, name in ((PeftModel, "push_to_hub"), (PreTrainedModel, "push_to_hub"),
                      (PreTrainedModel, "save_pretrained")):
        wrap_once(cls, name, _wrap)
