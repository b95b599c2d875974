"""Representation edits (CHAMELEON-style) in the harness: every user an adapter of self-generated shift clusters.

The base model writes a personalized and a neutral answer to generic prompts for each preference; the top
singular direction u of (personalized − neutral) layer outputs, scaled by a held-out α, becomes a rank-0
cluster ``shift = α u`` gated by the preference's keys (see :mod:`peft_persedit.editing.representation`).
All users are edited in one ``edit_users(..., method="representation")`` call.
"""

from __future__ import annotations

from .persedit import PersEdit


class Representation(PersEdit):
    name = "representation"
    edit_method = "representation"
