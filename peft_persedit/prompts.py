"""Prompt sets shipped with the package (neutral prompts, distractor questions, context prefixes)."""

from __future__ import annotations

import json
from importlib import resources

PROMPT_SETS = ("neutral_prompts", "distractor_questions", "context_prefixes")


def load_prompt_set(name: str) -> list[str]:
    """The prompt set ``name`` (one of :data:`PROMPT_SETS`) as a list of strings."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; choose from {PROMPT_SETS}")
    return json.loads(resources.files("peft_persedit").joinpath("data", f"{name}.json").read_text())
