"""Greedy generation of whole chats in mixed-adapter batches, and a one-pass test that a greedy output is unchanged.

A chat is a tuple of ``(role, content)`` pairs (hashable: identical requests are generated once). Row i
runs through ``adapters[i]`` (``"__base__"`` = no edit) when the model is a PeftModel; plain models take
``adapters=None``.

Unchanged outputs: greedy decoding of prompt x reproduces a continuation y = y₁…y_L iff
argmax_v P(v | x, y_<t) = y_t for every t — one teacher-forced forward pass over x ⊕ y instead of L decode
steps (left padding, positions from the attention mask as in ``generate``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..editing.chat import encode, pad_batch, pad_id
from ..editing.decoding import generate_batches
from ..peft_type import BASE_ADAPTER

Chat = tuple[tuple[str, str], ...]


@dataclass
class Generation:
    text: str
    ids: list[int]  # continuation up to and including the first end-of-sequence token
    seconds: float  # this row's share of its batch's wall time


def make_chat(question: str, system: str | None = None, history: Sequence[tuple[str, str]] = ()) -> Chat:
    """``[system] + history + [user: question]`` as a :data:`Chat`."""
    return ((("system", system),) if system else ()) + tuple(history) + (("user", question),)


def render(tokenizer: PreTrainedTokenizerBase, chat: Chat) -> list[int]:
    """Token ids of ``chat`` in the model's chat template, with the generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": role, "content": content} for role, content in chat]
        return encode(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return encode(tokenizer, "".join(f"{content}\n" for _, content in chat))


def eos_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """End-of-sequence ids of the generation config and the tokenizer."""
    config = getattr(model, "generation_config", None)
    value = getattr(config, "eos_token_id", None)
    ids = set(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def _batches(keys: list, lengths: dict, batch_size: int, desc: str | None):
    """Length-sorted batches of ``keys`` (little padding), with a progress bar when ``desc`` is given."""
    order = sorted(keys, key=lambda k: lengths[k])
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None, leave=False):
        yield order[start:start + batch_size]


def _routes(keys: list, routed: bool) -> list[str] | None:
    """The adapter of each request key (``None`` → ``BASE_ADAPTER``), or ``None`` for a plain model."""
    return [k[1] or BASE_ADAPTER for k in keys] if routed else None


@torch.no_grad()
def generate_chats(model: nn.Module, tokenizer: PreTrainedTokenizerBase, chats: Sequence[Chat],
                   adapters: Sequence[str] | None = None, *, max_new_tokens: int = 24, batch_size: int = 32,
                   desc: str | None = None) -> list[Generation]:
    """Greedy continuations of ``chats`` (row i through ``adapters[i]``), each distinct request generated once."""
    keys = [(chat, adapters[i] if adapters is not None else None) for i, chat in enumerate(chats)]
    unique = list(dict.fromkeys(keys))
    prompts = {k: render(tokenizer, k[0]) for k in unique}
    order = sorted(unique, key=lambda k: len(prompts[k]))  # length-sorted batches: little padding
    stop = eos_ids(model, tokenizer)
    model.eval()
    batches = generate_batches(model, tokenizer, [prompts[k] for k in order], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, adapters=_routes(order, adapters is not None), desc=desc)
    done: dict = {}
    for start, (new, seconds) in zip(range(0, len(order), batch_size), batches):
        batch = order[start:start + batch_size]
        for key, row in zip(batch, new.tolist()):
            cut = next((i + 1 for i, token in enumerate(row) if token in stop), len(row))
            text = tokenizer.decode(row[:cut], skip_special_tokens=True).strip()
            done[key] = Generation(text, row[:cut], seconds / len(batch))
    return [done[k] for k in keys]


@torch.no_grad()
def tail_logits(model: nn.Module, sequences: list[list[int]], keep: int, pad: int,
                adapters: list[str] | None = None) -> torch.Tensor:
    """Logits [B, keep, V] at the last ``keep`` positions of left-padded ``sequences`` (one forward pass)."""
    device = next(model.parameters()).device
    ids, mask = pad_batch(sequences, pad, left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {"adapter_names": list(adapters)} if adapters is not None else {}
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                logits_to_keep=keep, **kwargs)
    return out.logits[:, -keep:].float()


@torch.no_grad()
def greedy_unchanged(model: nn.Module, tokenizer: PreTrainedTokenizerBase, chats: Sequence[Chat],
                     continuations: Sequence[list[int]], adapters: Sequence[str] | None = None, *,
                     batch_size: int = 32, desc: str | None = None) -> list[bool]:
    """Whether greedy decoding of ``chats[i]`` (through ``adapters[i]``) reproduces ``continuations[i]``."""
    keys = [(chat, adapters[i] if adapters is not None else None, tuple(continuations[i]))
            for i, chat in enumerate(chats)]
    unique = list(dict.fromkeys(keys))
    prompts = {k: render(tokenizer, k[0]) for k in unique}
    model.eval()
    done: dict = {}
    for batch in _batches(unique, {k: len(prompts[k]) + len(k[2]) for k in unique}, batch_size, desc):
        keep = max(len(k[2]) for k in batch) + 1
        logits = tail_logits(model, [prompts[k] + list(k[2]) for k in batch], keep, pad_id(tokenizer),
                             _routes(batch, adapters is not None))
        for row, key in enumerate(batch):
            n = len(key[2])
            predicted = logits[row, keep - n - 1: keep - 1].argmax(-1).tolist()
            done[key] = predicted == list(key[2])
    return [done[k] for k in keys]
