"""ICE (in-context editing): the user's preference statements in the system prompt, weights untouched.

    system(u) = "You are a helpful AI assistant. The user told you this about themselves:\\n- t₁\\n- t₂ …"

with t = ``Preference.text`` (else "My {subject} is {target}."). The unpersonalized reference keeps the
first sentence only, so locality measures what the preference text changes, not the system prompt swap.
"""

from __future__ import annotations

from ...editing.representation import statement
from ...preferences import Preference
from .method import Method, Route, Users

ICE_HEADER = "You are a helpful AI assistant."


def ice_system(prefs: list[Preference]) -> str:
    """The ICE system prompt for one user's preferences."""
    facts = "\n".join(f"- {statement(p)}" for p in prefs)
    return f"{ICE_HEADER} The user told you this about themselves:\n{facts}" if prefs else ICE_HEADER


class ICE(Method):
    name = "ice"

    def personalize(self, users: Users) -> None:
        self.systems = {user: ice_system(prefs) for user, prefs in users.items()}

    def route(self, user: str | None) -> Route:
        return Route(system=self.systems[user] if user else ICE_HEADER)

    def adapter_bytes(self, user: str) -> int:
        """The prompt text that personalizes ``user`` (UTF-8 bytes)."""
        return len(self.systems[user].encode())
