"""DPL-style prompting (difference-aware personalization): the system prompt states what the user shares with the
representative users of their group and what makes them different.

Users are grouped by :func:`peft_persedit.group_users` over their preference sets (``ids`` embedding:
one-hot preference ids, so users who hold the same preferences fall together) into ⌈U / 10⌉ groups, and

    system(u) = "You are a helpful AI assistant. " + dpl_context(u)

Weights are untouched; the unpersonalized reference is the ICE header alone, as for ICE.
"""

from __future__ import annotations

import math

from ...groups import dpl_context, group_users
from .ice import ICE, ICE_HEADER
from .method import Users

USERS_PER_GROUP = 10


class DPL(ICE):
    name = "dpl"

    def personalize(self, users: Users) -> None:
        plan = group_users(users, math.ceil(len(users) / USERS_PER_GROUP), embedding="ids")
        self.systems = {user: f"{ICE_HEADER} {dpl_context(user, users, plan)}" for user in users}
        self.info["groups"] = len(plan.members)
