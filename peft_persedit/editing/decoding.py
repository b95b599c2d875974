"""Batched generation: left-padded batches of encoded prompts through ``model.generate`` (greedy by default),
optionally with one adapter per row (peft's mixed-adapter batches), returning the new tokens."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .chat import pad_batch, pad_id


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode within the block (inference; mixed-adapter batches need it), then back in the mode
    it was in — also on an exception."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_batches(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[int]], *,
                     max_new_tokens: int, batch_size: int, adapters: Sequence[str] | None = None,
                     desc: str | None = None, options: Mapping[str, Any] | None = None
                     ) -> Iterator[tuple[torch.Tensor, float]]:
    """For each batch of ``batch_size`` consecutive ``prompts`` (token ids, left-padded with the tokenizer's
    :func:`~.chat.pad_id`): the new tokens ``[B, ≤ max_new_tokens]`` and the wall time of the batch.

    Row i runs through ``adapters[i]`` when given. Decoding is greedy; ``options`` are further (or overriding)
    ``generate`` keyword arguments. A progress bar is shown when ``desc`` is given.
    """
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None, leave=False):
        ids, mask = pad_batch(list(prompts[start:start + batch_size]), pad, left=True)
        began = time.perf_counter()
        routing = {"adapter_names": adapters[start:start + batch_size]} if adapters is not None else {}
        kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": pad, **routing,
                  **(options or {})}
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        yield out[:, ids.shape[1]:], time.perf_counter() - began


def generate_texts(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[int]], *,
                   max_new_tokens: int, batch_size: int, adapters: Sequence[str] | None = None,
                   options: Mapping[str, Any] | None = None) -> list[str]:
    """The decoded continuations (special tokens skipped) of :func:`generate_batches`."""
    batches = generate_batches(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               adapters=adapters, options=options)
    return [text for new, _ in batches for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
