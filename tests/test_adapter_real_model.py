"""The adapter on the embedded SmolLM2-135M-Instruct: wrap, one keyed cluster, generate, save/load bit-identical."""

from __future__ import annotations

import pytest
import torch
from helpers import add_keyed_cluster, layer_io, threshold_between
from peft import get_peft_model
from torch.nn.functional import cosine_similarity

import peft_persedit
from peft_persedit import PersonalizationEditConfig
from peft_persedit.default_model import DefaultModelMissingError

PROMPTS = ["What's my hobby?", "Name a large city in France."]


def fresh_default_model():
    """A model of our own (the session's ``smol`` may be wrapped by other tests)."""
    try:
        return peft_persedit.load_default_model()
    except DefaultModelMissingError as err:
        pytest.skip(str(err))


def chat_ids(tokenizer, question: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt").input_ids


@pytest.mark.real_model
def test_real_model_edit_generate_and_reload(tmp_path):
    model, tokenizer = fresh_default_model()
    hobby, other = (chat_ids(tokenizer, q) for q in PROMPTS)
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    plain = model.generate(hobby, **options)
    pm = get_peft_model(model, PersonalizationEditConfig()).eval()
    layer = pm.base_model.edit_layers()["model.layers.5.mlp.down_proj"]  # ⌊0.17 · 30⌋
    x = layer_io(pm, layer, hobby)[0][0]  # [S, 1536]
    key_at = int(torch.nonzero(hobby[0] == tokenizer.convert_tokens_to_ids("?"))[-1]) - 1  # "hobby"'s last token
    x_other = layer_io(pm, layer, other)[0][0]
    cos = cosine_similarity(torch.cat([x, x_other]), x[key_at], dim=-1)
    tau = threshold_between(cos, min_above=1)
    add_keyed_cluster(layer, "default", x[key_at], tau, rank=4)
    with torch.no_grad():
        layer.persedit_B["default"].mul_(20)  # a big delta: the answer must change
    fires = [layer_io(pm, layer, ids)[1][0].abs().amax(-1) > 0 for ids in (hobby, other)]
    assert fires[0][key_at] and not fires[1].any()  # the edit fires on its question only
    edited = pm.generate(input_ids=hobby, **options)
    assert not torch.equal(edited, plain)
    with pm.disable_adapter():
        other_plain = pm.generate(input_ids=other, **options)
    assert torch.equal(pm.generate(input_ids=other, **options), other_plain)
    logits = pm(hobby).logits
    pm.save_pretrained(tmp_path)

    reloaded = peft_persedit.from_pretrained(fresh_default_model()[0], tmp_path)
    assert torch.equal(reloaded(hobby).logits, logits)
    assert torch.equal(reloaded.generate(input_ids=hobby, **options), edited)

