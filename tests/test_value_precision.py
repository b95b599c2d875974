"""The value step under a bf16 autocast (``value_precision="bfloat16"``): the blocks' matrix products run in bf16,
δ, the logits and the losses stay fp32, and δ stays close to the fp32 one, on tiny models."""

from __future__ import annotations

import pytest
import torch
from helpers import edit_layers, multi_prompt_requests, tiny_pm

from peft_persedit import PersonalizationEditConfig
from peft_persedit.editing import values


def test_bf16_value_steps_run_the_blocks_in_bf16_and_fit_a_delta_close_to_fp32(tokenizer, monkeypatch):
    pm = tiny_pm()
    layer = edit_layers(pm)[0]
    requests = multi_prompt_requests(tokenizer)
    common = dict(steps=4, lr=0.5, nll_stop=-1.0, progress=False)
    blocks, logits = [], []
    handle = layer.register_forward_hook(lambda m, a, out: blocks.append(out.dtype))
    losses = values.Chunk.losses
    monkeypatch.setattr(values.Chunk, "losses", lambda self, logp, ref: logits.append(logp.dtype) or
                        losses(self, logp, ref))
    try:
        full = values.optimize_values(pm, layer, requests, 2, **common)
        assert set(blocks) == {torch.float32}
        blocks.clear()
        half = values.optimize_values(pm, layer, requests, 2, precision=torch.bfloat16, **common)
    finally:
        handle.remove()
    assert set(blocks) == {torch.bfloat16} and set(logits) == {torch.float32}
    assert half.deltas.dtype == torch.float32 and half.final_nll.isfinite().all()
    cosine = torch.nn.functional.cosine_similarity(half.deltas, full.deltas, dim=-1)
    assert cosine.min() > 0.9, cosine
    torch.testing.assert_close(half.final_nll, full.final_nll, rtol=0.1, atol=0.05)


def test_value_precision_names_a_supported_dtype():
    assert PersonalizationEditConfig(value_precision="bfloat16").value_precision == "bfloat16"
    with pytest.raises(ValueError, match="value_precision"):
        PersonalizationEditConfig(value_precision="float16")
