"""Shared-prefix helpers of the editing pipeline (editing/prefix_cache.py)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from helpers import edit_layers, multi_prompt_requests, tiny_pm

FLAG = "TRANSFORMERS_SDPA_FORCE_GQA"


def test_grouped_query_attention_is_set_on_cpu_only_and_restored(monkeypatch):
    """On CPU the flag is set inside the block and removed after it (also after an error); on another device, or when
    the user set it, it is left as it is."""
    from peft_persedit.editing.prefix_cache import grouped_query_attention

    monkeypatch.delenv(FLAG, raising=False)
    with grouped_query_attention(torch.device("cpu")):
        assert os.environ[FLAG] == "1"
    assert FLAG not in os.environ
    with pytest.raises(RuntimeError), grouped_query_attention(torch.device("cpu")):
        raise RuntimeError
    assert FLAG not in os.environ
    with grouped_query_attention(torch.device("meta")):
        assert FLAG not in os.environ
    monkeypatch.setenv(FLAG, "0")
    with grouped_query_attention(torch.device("cpu")):
        assert os.environ[FLAG] == "0"
    assert os.environ[FLAG] == "0"


def test_values_with_grouped_query_attention_equal_those_with_copied_heads(tokenizer, monkeypatch):
    """The value step (a tiny model with 4 query heads over 2 key/value heads) gives the same δ whether SDPA runs the
    grouped heads as they are or copies the key/value heads first."""
    import inspect

    from transformers.integrations import sdpa_attention

    if FLAG not in inspect.getsource(sdpa_attention):
        pytest.skip(f"this transformers version has no {FLAG}")
    from peft_persedit.editing import value_chunks, values

    pm = tiny_pm()
    assert pm.get_base_model().config.num_key_value_heads < pm.get_base_model().config.num_attention_heads
    layer = edit_layers(pm)[0]
    requests = multi_prompt_requests(tokenizer)
    common = dict(steps=4, lr=0.5, nll_stop=-1.0, progress=False)
    monkeypatch.delenv(FLAG, raising=False)
    sdpa, gqa = torch.nn.functional.scaled_dot_product_attention, []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: gqa.append(k.get("enable_gqa", False)) or sdpa(*a, **k))
    grouped = values.optimize_values(pm, layer, requests, 2, **common).deltas
    flags = gqa[:]
    gqa.clear()
    monkeypatch.setattr(value_chunks, "grouped_query_attention", lambda device: contextlib.nullcontext())
    copied = values.optimize_values(pm, layer, requests, 2, **common).deltas
    assert len(flags) == len(gqa) and sum(flags) > sum(gqa)  # masked forwards too (unmasked ones use it anyway)
    torch.testing.assert_close(grouped, copied, atol=1e-5, rtol=1e-4)
