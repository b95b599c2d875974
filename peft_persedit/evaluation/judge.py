"""LLM-as-judge: a local model answers '1' or '0' to "does the answer match / fit the target?".

The judge's verdict is read from one forward pass: 1[logit('1') > logit('0')] at the first answer position
(greedy decoding restricted to the two allowed answers). Two prompts: ``match`` (the answer states the
target, in any wording) and ``relevance`` (a recommendation suits someone whose {subject} is the target).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..default_model import load_default_model
from ..editing.chat import chat_text, encode, pad_id
from .generation import tail_logits

PROMPTS = {
    "match": ("You grade answers. Question: {question}\nReference answer: {target}\nModel answer: {answer}\n"
              "Does the model answer give the reference answer (same meaning, any wording)? Reply with 1 for yes "
              "or 0 for no. Reply with the digit only."),
    "relevance": ("You grade recommendations. The user's {subject} is: {target}\nThe user asked: {question}\n"
                  "Recommendation: {answer}\nIs the recommendation specifically suited to the user's {subject} "
                  "({target})? Reply with 1 for yes or 0 for no. Reply with the digit only."),
}


@dataclass(frozen=True)
class JudgeItem:
    kind: str  # "match" | "relevance"
    question: str
    target: str
    subject: str
    answer: str


class LLMJudge:
    """``LLMJudge(path).verdicts(items)`` → one bool per item."""

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 16, progress: bool = True) -> None:
        self.name = model
        self.model, self.tokenizer = load_default_model(model, device=device)
        self.batch_size = batch_size
        self.progress = progress
        self.yes, self.no = (self._token(d) for d in "10")

    def _token(self, digit: str) -> int:
        ids = self.tokenizer(digit, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"judge {self.name!r}: its tokenizer has no token for {digit!r}")
        return ids[-1]

    def prompt(self, item: JudgeItem) -> list[int]:
        text = PROMPTS[item.kind].format(question=item.question, target=item.target, subject=item.subject,
                                         answer=item.answer or "(empty)")
        return encode(self.tokenizer, chat_text(self.tokenizer, text))

    @torch.no_grad()
    def verdicts(self, items: Sequence[JudgeItem]) -> list[bool]:
        unique = list(dict.fromkeys(items))
        done: dict[JudgeItem, bool] = {}
        starts = range(0, len(unique), self.batch_size)
        for start in tqdm(starts, desc="judge", disable=not self.progress, leave=False):
            batch = unique[start:start + self.batch_size]
            logits = tail_logits(self.model, [self.prompt(i) for i in batch], 1, pad_id(self.tokenizer))[:, -1]
            for item, row in zip(batch, logits):
                done[item] = bool(row[self.yes] > row[self.no])
        return [done[i] for i in items]
