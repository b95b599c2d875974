"""Users from preference items: which items are evaluated, and how they are grouped into users.

* ``--limit N`` keeps N items round-robin over attribute types (first item of every type, then the second
  ...), so a limited run on a type-sorted file such as UPQA balanced100 still covers every type.
* protocol ``single``: every item is a user of its own (``u000``, ``u001``, ...), one adapter each.
* protocol ``grouped``: up to ``size`` items per user (``g00``, ...), never two with the same attribute type
  or the same question (a user has one hobby; two answers to one question would contradict); a last
  group with fewer than 2 items is dropped.
"""

from __future__ import annotations

from ..preferences import Preference

Users = dict[str, list[Preference]]


def round_robin(prefs: list[Preference], limit: int | None = None) -> list[Preference]:
    """``prefs`` interleaved over subjects (first-appearance order), truncated to ``limit``."""
    by_subject: dict[str, list[Preference]] = {}
    for pref in prefs:
        by_subject.setdefault(pref.subject.lower(), []).append(pref)
    queues = list(by_subject.values())
    out: list[Preference] = []
    for depth in range(max(len(q) for q in queues)):
        out += [q[depth] for q in queues if depth < len(q)]
    return out[:limit] if limit else out


def single_users(prefs: list[Preference]) -> Users:
    """One user per preference."""
    return {f"u{i:03d}": [pref] for i, pref in enumerate(prefs)}


def grouped_users(prefs: list[Preference], size: int = 10) -> Users:
    """Greedy first-fit grouping: each preference joins the first open user without its subject or question."""
    groups: list[list[Preference]] = []
    for pref in prefs:
        for group in groups:
            clash = any(p.subject.lower() == pref.subject.lower() or p.question.lower() == pref.question.lower()
                        for p in group)
            if len(group) < size and not clash:
                group.append(pref)
                break
        else:
            groups.append([pref])
    return {f"g{i:02d}": group for i, group in enumerate(g for g in groups if len(g) >= 2)}


def spread(names: list[str], k: int) -> list[str]:
    """``k`` evenly spaced entries of ``names`` (all of them when k = 0 or k ≥ len)."""
    if k == 0 or k >= len(names):
        return list(names)
    return [names[round(i * (len(names) - 1) / max(1, k - 1))] for i in range(k)] if k > 1 else names[:1]
