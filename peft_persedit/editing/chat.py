"""Prompt formatting in the model's own chat template, and locating the subject's last token."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase


class SubjectNotFoundError(ValueError):
    """The preference's subject does not occur in its question."""


def chat_text(tokenizer: PreTrainedTokenizerBase, question: str, system: str | None = None,
              history: Sequence[tuple[str, str]] = ()) -> str:
    """``question`` as the model sees it at inference: the chat template with the generation prompt, after the
    earlier ``history`` turns (user, assistant)."""
    turns = [text for pair in history for text in pair]
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
        messages.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{line}\n" for line in ([system] if system else []) + turns + [question])


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of an already formatted text (the template carries its own special tokens)."""
    return tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]


def subject_token_index(tokenizer: PreTrainedTokenizerBase, text: str, question: str, subject: str,
                        key_token: str = "subject_last", name: str = "") -> int:
    """Index of the token holding the last character of ``subject`` inside ``question`` within ``text``
    (its last whole-word occurrence, else its last occurrence as a substring).

    With ``key_token="prompt_last"`` (or as its fallback when the subject is absent and allowed), the last
    prompt token. Raises :class:`SubjectNotFoundError` naming the preference otherwise.
    """
    ids = encode(tokenizer, text)
    if key_token == "prompt_last":
        return len(ids) - 1
    q_start = text.rfind(question)
    word = re.escape(subject.strip())
    matches = list(re.finditer(rf"\b{word}\b", question, re.IGNORECASE)) if subject.strip() else []
    s_start = matches[-1].start() if matches else question.lower().rfind(subject.lower())
    if q_start < 0 or s_start < 0 or not subject.strip():
        raise SubjectNotFoundError(
            f"preference {name or subject!r}: subject {subject!r} does not occur in question {question!r} "
            "(rephrase the question, give synonyms/questions that contain it, or use key_token='prompt_last')"
        )
    end = q_start + s_start + len(subject)  # one past the subject's last character
    return len(encode(tokenizer, text[:end])) - 1


def pad_batch(sequences: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists to ``input_ids`` and ``attention_mask`` tensors (right padding unless ``left``)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, else its eos id, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0
