"""Scores of one answer against its target: exact (substring) and semantic without a judge (word overlap).

    hit(a, y)     = 1[lower(y) ⊂ lower(a)]                                  (UPQA's efficacy criterion)
    overlap(a, y) = |W(y) ∩ W(a)| / |W(y)|,   W(t) = {stem(w) : w ∈ words(t), w ∉ stopwords}
    match(a, y)   = 1[overlap(a, y) ≥ ½]

``stem`` strips a few English suffixes (-ing, -ed, -es, -s, -ly, -er, -e; stem ≥ 3 letters), so
"Dancing at clubs" → {danc, club} matches "I love to dance in a club". A target with no content word
falls back to ``hit``.
"""

from __future__ import annotations

import re

from ..editing.verify import target_hit

__all__ = ["MATCH_THRESHOLD", "STOPWORDS", "content_words", "overlap", "stem", "target_hit", "word_match"]

MATCH_THRESHOLD = 0.5

STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her here
hers herself him himself his how i if in into is it its itself just like me more most my myself no nor not now
of off on once only or other our ours ourselves out over own really same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself yourselves
""".split())

_SUFFIXES = ("ingly", "edly", "ing", "ies", "ied", "es", "ed", "ly", "er", "s", "e")


def stem(word: str) -> str:
    """Crude English stemming: drop the first matching suffix of :data:`_SUFFIXES` leaving ≥ 3 letters."""
    word = word.lower()
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiouls":  # runn → run, shopp → shop
        word = word[:-1]
    return word


def content_words(text: str) -> set[str]:
    """Stems of the non-stopword words (letters/digits) of ``text``."""
    return {stem(w) for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOPWORDS}


def overlap(answer: str, target: str) -> float:
    """Share of the target's content words found (stemmed) in the answer; ``hit`` when it has none."""
    wanted = content_words(target)
    if not wanted:
        return float(target_hit(answer, target))
    return len(wanted & content_words(answer)) / len(wanted)


def word_match(answer: str, target: str) -> bool:
    """The judge-free semantic criterion: ``overlap ≥ MATCH_THRESHOLD``."""
    return overlap(answer, target) >= MATCH_THRESHOLD
