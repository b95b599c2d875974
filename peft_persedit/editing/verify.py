"""Verify: greedy answers per adapter (one mixed-adapter batch) and the efficacy check."""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from .chat import chat_text, encode
from .decoding import eval_mode, generate_texts


def target_hit(answer: str, target: str) -> bool:
    """Efficacy criterion of UPQA: the target is a (case-insensitive) substring of the answer."""
    return target.strip().lower() in answer.lower()


@torch.no_grad()
def answer_questions(peft_model: PeftModel, tokenizer: PreTrainedTokenizerBase, questions: list[str],
                     adapters: list[str] | None = None, max_new_tokens: int = 24, batch_size: int = 32,
                     system: str | None = None) -> list[str]:
    """Greedy answers; row i uses ``adapters[i]`` (``"__base__"`` = no edit, None = active adapter)."""
    prompts = [encode(tokenizer, chat_text(tokenizer, q, system)) for q in questions]
    with eval_mode(peft_model):
        answers = generate_texts(peft_model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, adapters=adapters)
    return [a.strip() for a in answers]
