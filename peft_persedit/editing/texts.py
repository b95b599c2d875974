"""Scoring texts with a model: a prompt's response read back in the chat template, the mean residual state over
the response and its mean log-likelihood (used by representation edits and user embeddings).

For prompt x and response y = y_1..y_m the read-back sequence is chat(x) ⊕ y ⊕ eos; positions a..b−1 predict the
response tokens, so  h_l(x, y) = 1/(b−a) Σ_{t=a}^{b−1} h_l[t]  and  ℓ(y|x) = 1/(b−a) Σ_t log p(token_{t+1} | ≤ t).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..preferences import Preference
from .chat import chat_text, encode, pad_batch, pad_id


def statement(pref: Preference) -> str:
    """The preference in the user's words: ``text``, else "My {subject} is {target}."."""
    return pref.text or f"My {pref.subject} is {pref.target}."


@dataclass
class Texts:
    """Prompt + response token ids; ``spans[i] = (a, b)``: positions a..b−1 predict the response tokens."""

    sequences: list[list[int]]
    spans: list[tuple[int, int]]


def read_back(tokenizer, prompts: list[str], responses: list[str]) -> Texts:
    """Each response after its prompt in the chat template (no system prompt), ending in eos."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    sequences, spans = [], []
    for prompt, response in zip(prompts, responses):
        head = encode(tokenizer, chat_text(tokenizer, prompt))
        tail = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
        tail = tail or [pad_id(tokenizer)]
        sequences.append(head + tail)
        spans.append((len(head) - 1, len(head) + len(tail) - 1))
    return Texts(sequences, spans)


def _batches(model: nn.Module, texts: Texts, pad: int, batch_size: int, adapters: list[str] | None = None,
             hidden: bool = False) -> Iterator[tuple[int, torch.Tensor, object]]:
    """(first row, input ids, model output) per right-padded batch; rows routed through ``adapters``."""
    device = next(model.parameters()).device
    for start in range(0, len(texts.sequences), batch_size):
        ids, mask = pad_batch(texts.sequences[start:start + batch_size], pad)
        kwargs = {"adapter_names": adapters[start:start + batch_size]} if adapters is not None else {}
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=hidden, **kwargs)
        yield start, ids.to(device), out


@torch.no_grad()
def span_means(model: nn.Module, texts: Texts, blocks: list[int], pad: int, batch_size: int = 16) -> list[torch.Tensor]:
    """Per block l in ``blocks``: [N, d] means over each span of the residual stream after block l."""
    out: list[list[torch.Tensor]] = [[] for _ in blocks]
    for start, _, result in _batches(model, texts, pad, batch_size, hidden=True):
        for slot, block in enumerate(blocks):
            states = result.hidden_states[block + 1].float()
            for row in range(states.shape[0]):
                a, b = texts.spans[start + row]
                out[slot].append(states[row, a:b].mean(0))
    return [torch.stack(o) for o in out]


@torch.no_grad()
def response_log_likelihood(model: nn.Module, texts: Texts, pad: int, adapters: list[str] | None = None,
                            batch_size: int = 16) -> torch.Tensor:
    """[N] mean log p(response token | everything before it), row i through ``adapters[i]``."""
    scores = []
    for start, ids, result in _batches(model, texts, pad, batch_size, adapters):
        logp = torch.log_softmax(result.logits.float(), dim=-1)
        for row in range(ids.shape[0]):
            a, b = texts.spans[start + row]
            targets = ids[row, a + 1:b + 1]
            scores.append(logp[row, a:b].gather(-1, targets[:, None]).mean())
    return torch.stack(scores).cpu()
