"""The value step under a bf16 autocast (``value_precision="bfloat16"``): the blocks' matrix products run in bf16,
δ, the logits and the losses stay fp32, and δ stays close to the fp32 one, on tiny models."""

from __future__ import annotations

import pytest
import torch
from helpers import edit_layers, multi_prompt_requests, tiny_pm

from peft_persedit import PersonalizationEditConfig
from peft_persedit.editing import values


def test_bf16_value_steps_run_the_blocks_in_bf16_then_the_last_steps_in_fp32(tokenizer, monkeypatch):
    """precision = bf16: the first steps' blocks run in bf16 (logits and δ fp32), the last three steps in fp32
    (chunks rebuilt), and δ stays close to the one of fp32 steps."""
    pm = tiny_pm()
    layer = edit_layers(pm)[0]
    requests = multi_prompt_requests(tokenizer)
    common = dict(steps=6, lr=0.5, nll_stop=-1.0, progress=False)  # nll_stop < 0: nobody finishes early
    blocks, logits, steps = [], [], []
    handle = layer.register_forward_hook(lambda m, a, out: blocks.append(out.dtype))
    losses, backward = values.Chunk.losses, values._backward
    monkeypatch.setattr(values.Chunk, "losses", lambda self, logp, ref: logits.append(logp.dtype) or
                        losses(self, logp, ref))

    def recorded(*args, **kwargs):  # the layer's output dtypes in each step's forwards
        start = len(blocks)
        out = backward(*args, **kwargs)
        steps.append(set(blocks[start:]))
        return out

    monkeypatch.setattr(values, "_backward", recorded)
    try:
        full = values.optimize_values(pm, layer, requests, 2, **common)
        assert set(blocks) == {torch.float32}
        steps.clear()
        half = values.optimize_values(pm, layer, requests, 2, precision=torch.bfloat16, **common)
    finally:
        handle.remove()
    assert steps == [{torch.bfloat16}] * 3 + [{torch.float32}] * 3 and set(logits) == {torch.float32}
    assert half.deltas.dtype == torch.float32 and half.final_nll.isfinite().all()
    cosine = torch.nn.functional.cosine_similarity(half.deltas, full.deltas, dim=-1)
    assert cosine.min() > 0.9, cosine
    torch.testing.assert_close(half.final_nll, full.final_nll, rtol=0.1, atol=0.05)


def test_bf16_value_steps_hand_over_to_fp32_once_half_would_finish_and_only_fp32_steps_finish(tokenizer,
                                                                                              monkeypatch):
    """Preferences 0 and 1 of 3 meet the finishing rule from step 0 (in bf16): the next step runs in fp32 and
    finishes them there; preference 2 goes on."""
    pm = tiny_pm()
    layer = edit_layers(pm)[0]
    blocks, seen = [], []
    handle = layer.register_forward_hook(lambda m, a, out: blocks.append(out.dtype))
    backward, said = values._backward, torch.arange(3) < 2

    def two_say_it_at_once(*args, **kwargs):
        seen.append((args[4].tolist(), blocks[-1] if blocks else None))
        nll, greedy = backward(*args, **kwargs)
        seen[-1] = (*seen[-1], blocks[-1])
        return torch.where(said, 0.0, nll), greedy | said

    monkeypatch.setattr(values, "_backward", two_say_it_at_once)
    try:
        values.optimize_values(pm, layer, multi_prompt_requests(tokenizer), 2, steps=8, lr=0.5, nll_stop=0.1,
                               progress=False, precision=torch.bfloat16)
    finally:
        handle.remove()
    (done0, _, dtype0), (done1, _, dtype1), (done2, _, dtype2) = seen[:3]
    assert dtype0 == torch.bfloat16 and dtype1 == dtype2 == torch.float32
    assert done0 == done1 == [False] * 3 and done2 == [True, True, False]


def test_value_precision_names_a_supported_dtype():
    assert PersonalizationEditConfig(value_precision="bfloat16").value_precision == "bfloat16"
    with pytest.raises(ValueError, match="value_precision"):
        PersonalizationEditConfig(value_precision="float16")
