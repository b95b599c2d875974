"""Verify: greedy answers per adapter (one mixed-adapter batch) and the efficacy check."""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from .chat import chat_text, encode, pad_batch, pad_id


def target_hit(answer: str, target: str) -> bool:
    """Efficacy criterion of UPQA: the target is a (case-insensitive) substring of the answer."""
    return target.strip().lower() in answer.lower()


@torch.no_grad()
def answer_questions(peft_model: PeftModel, tokenizer: PreTrainedTokenizerBase, questions: list[str],
                     adapters: list[str] | None = None, max_new_tokens: int = 24, batch_size: int = 32,
                     system: str | None = None) -> list[str]:
    """Greedy answers; row i uses ``adapters[i]`` (``"__base__"`` = no edit, None = active adapter)."""
    pad = pad_id(tokenizer)
    device = next(peft_model.parameters()).device
    answers: list[str] = []
    was_training = peft_model.training
    peft_model.eval()  # generation is inference (and mixed-adapter batches need eval mode)
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        ids, mask = pad_batch([encode(tokenizer, chat_text(tokenizer, q, system)) for q in chunk], pad, left=True)
        kwargs = {"adapter_names": adapters[start:start + batch_size]} if adapters is not None else {}
        out = peft_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                  max_new_tokens=max_new_tokens, pad_token_id=pad, **kwargs)
        answers.extend(a.strip() for a in tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True))
    peft_model.train(was_training)
    return answers
