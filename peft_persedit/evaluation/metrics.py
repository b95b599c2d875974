"""The metrics: which question each asks, the per-row record, and the aggregation into a summary.

Per method and protocol, over the users' preferences p:

    efficacy        p.question                  exact = 1[target ⊂ answer],  semantic = judge or overlap ≥ ½
    generalization  p.paraphrased_question      (same scores)
    implicit        p.implicit_question         (same scores)
    product         p.product_question          exact as above; semantic = judged relevance to the target
    multiturn@N     p.question after N distractor turns (N = 0 is efficacy)
    locality_neutral / locality_other           per user u: share of neutral prompts / of other users'
                    questions (other subject and question) whose greedy output u's personalization leaves
                    unchanged; averaged over the sampled users.
    fluency         per question metric: mean distinct-3 of the answers, |distinct word trigrams| / |trigrams|
                    (1 for an answer without a repeated trigram); an edit that makes answers loop lowers it.
                    Unlike ROME's n-gram entropy it does not penalize a short, complete answer.

The gate-threshold sweep (persedit, protocol single) repeats the four question metrics and locality with every
gate threshold moved, τ_c ← τ_c + o; :func:`frontier` gives one row of exact shares per offset o.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass

QUESTION_METRICS: dict[str, str] = {
    "efficacy": "question",
    "generalization": "paraphrased_question",
    "implicit": "implicit_question",
    "product": "product_question",
}
LOCALITY_METRICS = ("locality_neutral", "locality_other")
MULTITURN = "multiturn"
#: The columns of a frontier row (exact shares at 0 distractor turns).
FRONTIER_METRICS = (*QUESTION_METRICS, *LOCALITY_METRICS)


@dataclass
class Record:
    """One evaluated row (one generation, or one locality check)."""

    protocol: str
    method: str
    user: str
    item: str  # preference id ("" for a neutral prompt)
    metric: str
    turns: int
    question: str
    target: str
    answer: str  # the greedy answer (locality: the unpersonalized reference output)
    exact: bool  # target substring (locality: output unchanged)
    overlap: float | None = None  # content-word overlap with the target
    semantic: bool | None = None  # judge verdict, else overlap ≥ ½ (None for locality)
    seconds: float = 0.0  # share of its batch's wall time

    def to_dict(self) -> dict:
        return asdict(self)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def distinct_ngrams(text: str, n: int = 3) -> float:
    """distinct-n of ``text``: |set of word n-grams| / |n-grams| (words and punctuation marks, lower-cased); 1.0
    when it has no n-gram."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def summarize(records: list[Record]) -> list[dict]:
    """Rows ``{protocol, method, metric, turns, n, exact, semantic, fluency}``; locality averaged per user first
    (its fluency: None).

    ``multiturn`` at N = 0 is filled from ``efficacy``.
    """
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.protocol, r.method, r.metric, r.turns)].append(r)
    rows = []
    for (protocol, method, metric, turns), members in groups.items():
        if metric in LOCALITY_METRICS:
            per_user: dict[str, list[bool]] = defaultdict(list)
            for r in members:
                per_user[r.user].append(r.exact)
            exact = _mean([_mean([float(x) for x in v]) for v in per_user.values()])
            semantic = None
            fluency = None
        else:
            exact = _mean([float(r.exact) for r in members])
            semantic = _mean([float(r.semantic) for r in members if r.semantic is not None])
            fluency = _mean([distinct_ngrams(r.answer) for r in members])
        rows.append({"protocol": protocol, "method": method, "metric": metric, "turns": turns, "n": len(members),
                     "exact": exact, "semantic": semantic, "fluency": fluency})
    rows += [{**row, "metric": MULTITURN, "turns": 0} for row in rows if row["metric"] == "efficacy"
             and any(r["metric"] == MULTITURN and r["protocol"] == row["protocol"] for r in rows)]
    return rows


def frontier(protocol: str, method: str, by_offset: dict[float, list[Record]]) -> list[dict]:
    """Rows ``{protocol, method, gate_offset, <metric>: exact share}`` of ``method``'s records at each gate offset,
    ascending (a metric without records: ``None``)."""
    rows = []
    for offset in sorted(by_offset):
        exact = {r["metric"]: r["exact"] for r in summarize(by_offset[offset])
                 if (r["protocol"], r["method"], r["turns"]) == (protocol, method, 0)}
        rows.append({"protocol": protocol, "method": method, "gate_offset": offset,
                     **{metric: exact.get(metric) for metric in FRONTIER_METRICS}})
    return rows
