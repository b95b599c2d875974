"""Prompt sets shipped with the package (package data ``peft_persedit/data/*.json``).

* ``neutral_prompts`` — generic prompts (none about the user), alternating short factual questions and
  longer tasks; for locality measurement and gate calibration.
* ``distractor_questions`` — short generic questions for distractor turns in multi-turn evaluation.
* ``context_prefixes`` — short neutral sentences, fallback context templates when averaging keys.
* ``request_templates`` — requests about "my {subject}" (advice, purchases, plans, recall): the kinds of request
  a preference must shape besides its literal question; edits are keyed and fit on them too.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

__all__ = ["PROMPT_SETS", "load_prompt_set"]

PROMPT_SETS = ("neutral_prompts", "distractor_questions", "context_prefixes", "request_templates")


@cache
def _read(name: str) -> tuple[str, ...]:
    text = resources.files("peft_persedit").joinpath("data", f"{name}.json").read_text(encoding="utf-8")
    data = json.loads(text)
    if not isinstance(data, list) or not all(isinstance(p, str) and p.strip() for p in data):
        raise ValueError(f"prompt set {name!r} must be a JSON list of non-empty strings")
    return tuple(data)


def load_prompt_set(name: str) -> list[str]:
    """The prompt set ``name`` (one of :data:`PROMPT_SETS`) as a new list of strings."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; choose from {', '.join(PROMPT_SETS)}")
    return list(_read(name))
