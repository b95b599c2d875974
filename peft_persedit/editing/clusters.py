"""Clusters: a preference as a set of keys — its question, synonym questions and context variants.

When no synonyms are given the base model is asked for them (offline), and the question is rewritten
with each. Keys beyond ``m`` per cluster are compressed with k-means (centroids of unit directions).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..preferences import Preference
from ..prompts import load_prompt_set
from .chat import chat_text
from .selftext import generate

SYNONYM_PROMPT = 'Give {n} synonyms for the word "{subject}". Answer with a comma-separated list only.'


def parse_synonyms(text: str, subject: str, n: int) -> list[str]:
    """Clean a model's comma/newline separated list: no numbering, no duplicates, not the subject itself."""
    out: list[str] = []
    for raw in re.split(r"[,\n;]", text):
        word = re.sub(r"^[\s\d.)*-]+", "", raw).strip(" .\"'").lower()
        if word and len(word.split()) <= 3 and word != subject.lower() and word not in out and word.isascii():
            out.append(word)
    return out[:n]


def model_synonyms(model: nn.Module, tokenizer: PreTrainedTokenizerBase, subjects: list[str],
                   n: int = 4) -> dict[str, list[str]]:
    """Synonyms of each subject, written by the model itself (greedy)."""
    unique = sorted(set(subjects))
    prompts = [chat_text(tokenizer, SYNONYM_PROMPT.format(n=n, subject=s)) for s in unique]
    answers = generate(model, tokenizer, prompts, max_new_tokens=24)
    return {s: parse_synonyms(a, s, n) for s, a in zip(unique, answers)}


def request_members(pref: Preference, n: int) -> list[tuple[str, str]]:
    """(request, subject) pairs from the first ``n`` shipped request templates, about ``pref``'s subject."""
    return [(t.format(subject=pref.subject), pref.subject) for t in load_prompt_set("request_templates")[:n]]


def cluster_members(pref: Preference, synonyms: list[str] | None = None) -> list[tuple[str, str]]:
    """(question, subject-in-question) pairs of the cluster: the preference's own first.

    Given questions/synonyms are used as they are; otherwise ``synonyms`` rewrite the question.
    """
    members = [(pref.question, pref.subject)]
    if pref.questions:
        subjects = pref.synonyms or (pref.subject,) * len(pref.questions)
        members += list(zip(pref.questions, subjects))
    elif synonyms:
        pattern = re.compile(re.escape(pref.subject), re.IGNORECASE)
        for word in synonyms:
            if pattern.search(pref.question):
                members.append((pattern.sub(word, pref.question), word))
    seen: set[str] = set()
    unique = [m for m in members if not (m[0] in seen or seen.add(m[0]))]
    kept = unique[:1]  # the preference's own question always stays
    for member in unique[1:]:
        if not any(_key_inside(member, k) or _key_inside(k, member) for k in kept):
            kept.append(member)
    return kept


def _key_prefix(question: str, subject: str) -> str:
    """The question's text up to and including the subject's last occurrence (what the key token sees)."""
    end = question.lower().rfind(subject.lower())
    return question[: end + len(subject)].lower() if end >= 0 else question.lower()


def _key_inside(member: tuple[str, str], other: tuple[str, str]) -> bool:
    """True when ``member``'s key token is an earlier, non-key token of ``other`` (same causal prefix, e.g.
    the synonym "food" of "food preference"): such a key would fire inside the other question."""
    mine, theirs = _key_prefix(*member), _key_prefix(*other)
    return len(mine) < len(theirs) and theirs.startswith(mine)


def kmeans(x: torch.Tensor, k: int, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """Spherical k-means: ``k`` unit centroids of the rows of ``x`` (returns ``x`` itself when n ≤ k)."""
    if x.shape[0] <= k:
        return x
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    centroids = unit[torch.randperm(unit.shape[0], generator=generator)[:k]]
    for _ in range(iterations):
        assign = (unit @ centroids.T).argmax(-1)
        for j in range(k):
            members = unit[assign == j]
            if members.shape[0]:
                centroids[j] = torch.nn.functional.normalize(members.mean(0), dim=-1)
    scale = x.float().norm(dim=-1).mean()
    return centroids * scale
