"""Shared prefixes: the key/value cache of tokens many rows start with (the chat template's system turn, earlier
chat turns), computed once at batch size 1 and repeated per batch, so that only each row's own suffix is run."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (no LM head) of a causal LM, or of the one a :class:`~peft.PeftModel` wraps."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.base_model


@functools.cache
def cache_argument(decoder_class: type[nn.Module]) -> str:
    """The decoder class's key/value-cache argument and output field: ``cache`` (transformers ≥ 5.x renamed it) or
    ``past_key_values``; read once per class (it is asked on every forward of the value steps)."""
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"


def repeated(cache: Any, rows: int) -> Any:
    """A copy of ``cache`` for one forward (which appends to the cache it is given; the original stays the bare
    prefix); with ``rows`` > 1, the single row of a batch-1 cache repeated ``rows`` times."""
    cache = copy.deepcopy(cache)
    if rows > 1:
        cache.batch_repeat_interleave(rows)
    return cache


@contextlib.contextmanager
def grouped_query_attention(device: torch.device) -> Iterator[None]:
    """On CPU, let transformers' SDPA attention run grouped-query heads as they are (``enable_gqa``) instead of
    copying each key/value head for its query heads first, also under an attention mask
    (``TRANSFORMERS_SDPA_FORCE_GQA``, read on every call by transformers ≥ 5; older versions ignore it). The same
    scores; with long cached prefixes (earlier chat turns) the copies cost more than the attention itself. Elsewhere
    (CUDA falls back to the math kernel under a mask) a no-op."""
    if device.type != "cpu" or _GQA_FLAG in os.environ:
        yield
        return
    os.environ[_GQA_FLAG] = "1"
    try:
        yield
    finally:
        os.environ.pop(_GQA_FLAG, None)


_GQA_FLAG = "TRANSFORMERS_SDPA_FORCE_GQA"
