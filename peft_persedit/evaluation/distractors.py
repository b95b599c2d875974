"""Distractor turns for the multi-turn metric: (user, assistant) pairs placed before the question.

Default: the generic ``distractor_questions`` prompt set answered by the base model itself (greedy, offline,
cached per model; each answer cut to its first sentence so that N turns stay short). ``--fillers FILE``
takes them from conversations instead: a JSON list of ``{"conversation": [{"role", "content"}, ...]}``
whose user → assistant pairs are used in order. Every item gets the same first N turns; N beyond the
available pairs cycles through them again.
"""

from __future__ import annotations

import json
import os
import re
from itertools import cycle, islice
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..editing.selftext import _cached_json, model_fingerprint
from ..prompts import load_prompt_set
from .generation import generate_chats, make_chat

Pair = tuple[str, str]  # (user question, assistant answer)


def first_sentence(text: str, max_words: int = 30) -> str:
    """The first sentence (or line) of ``text``, at most ``max_words`` words."""
    head = re.split(r"(?<=[.!?])\s|\n", text.strip(), maxsplit=1)[0]
    return " ".join(head.split()[:max_words])


def model_distractors(model: nn.Module, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int = 32,
                      batch_size: int = 32) -> list[Pair]:
    """The distractor questions with the model's own (first-sentence) greedy answers, cached per model."""
    questions = load_prompt_set("distractor_questions")

    def build() -> list[str]:
        answers = generate_chats(model, tokenizer, [make_chat(q) for q in questions], max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, desc="distractor answers")
        return [first_sentence(a.text) or "I'm not sure." for a in answers]

    answers = _cached_json(f"distractors_{len(questions)}_{max_new_tokens}", model_fingerprint(model, tokenizer), build)
    return list(zip(questions, answers))


def load_fillers(path: str | os.PathLike) -> list[Pair]:
    """User → assistant pairs from a fillers file; a bad file raises one line naming the entry and field."""
    name = Path(path).name
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{name}: fillers file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{name}: cannot read fillers ({str(err).splitlines()[0]})") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{name}: expected a non-empty JSON list of {{\"conversation\": [...]}} objects")
    pairs: list[Pair] = []
    for i, entry in enumerate(data):
        turns = entry.get("conversation") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            raise ValueError(f"{name}: item {i}: field 'conversation' must be a list of {{role, content}} messages")
        pending: str | None = None
        for j, message in enumerate(turns):
            role = message.get("role") if isinstance(message, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            if role not in ("system", "user", "assistant") or not isinstance(content, str) or not content.strip():
                raise ValueError(f"{name}: item {i}: conversation[{j}] needs 'role' (user/assistant/system) and "
                                 "a non-empty string 'content'")
            if role == "user":
                pending = content.strip()
            elif role == "assistant" and pending is not None:
                pairs.append((pending, content.strip()))
                pending = None
    if not pairs:
        raise ValueError(f"{name}: no user → assistant turn pairs in any conversation")
    return pairs


def history(pairs: list[Pair], turns: int) -> tuple[Pair, ...]:
    """The first ``turns`` pairs (cycling) as chat messages: (user, q₁), (assistant, a₁), …"""
    return tuple(m for q, a in islice(cycle(pairs), turns) for m in (("user", q), ("assistant", a)))
