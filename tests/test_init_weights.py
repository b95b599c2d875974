"""``init_weights``: identity start (default) or a random one, as peft's tuners; empty bank tensors stay frozen."""

from __future__ import annotations

import pytest
import torch
from helpers import add_random_clusters, edit_layers
from peft import PeftModel, get_peft_model
from tiny_models import make_tiny_model

from peft_persedit import PersonalizationEditConfig

IDS = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))


def wrap(**kwargs) -> PeftModel:
    return get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(init_clusters=2, init_rank=4, **kwargs))


def test_default_init_is_the_identity():
    pm = wrap()
    assert torch.equal(pm(IDS).logits, make_tiny_model("llama")(IDS).logits)
    assert not edit_layers(pm)[0].persedit_B["default"].any()


def test_init_weights_false_changes_the_output():
    pm = wrap(init_weights=False)
    layer = edit_layers(pm)[0]
    assert layer.persedit_B["default"].abs().min() > 0  # every rank column nonzero
    assert not torch.allclose(pm(IDS).logits, make_tiny_model("llama")(IDS).logits)


def test_init_weights_false_follows_torchs_seed():
    def layer(seed: int):
        model = make_tiny_model("llama")  # (seeds torch itself)
        torch.manual_seed(seed)
        config = PersonalizationEditConfig(init_clusters=2, init_rank=4, init_weights=False)
        return edit_layers(get_peft_model(model, config))[0]

    first, again, other = layer(3), layer(3), layer(4)
    for name in ("A", "B"):
        assert torch.equal(first._tensor(name, "default"), again._tensor(name, "default"))
        assert not torch.equal(first._tensor(name, "default"), other._tensor(name, "default"))


def test_init_weights_round_trips_and_saved_banks_are_not_reinitialised(tmp_path):
    pm = wrap(init_weights=False)
    reference = pm(IDS).logits
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path)
    assert loaded.peft_config["default"].init_weights is False
    assert torch.equal(loaded(IDS).logits, reference)


def test_empty_tensors_are_frozen_and_become_trainable_when_the_bank_grows():
    pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(trainable=["A", "B", "keys"]))
    layer = edit_layers(pm)[0]
    assert not any(p.requires_grad for p in layer.parameters())  # an empty bank: nothing a gradient can reach
    add_random_clusters(layer, "default", 2)
    grads = {n: layer._tensor(n, "default").requires_grad for n in ("A", "B", "keys", "shift")}
    assert grads == {"A": True, "B": True, "keys": True, "shift": False}


@pytest.mark.parametrize("enable", [False, True])
def test_a_grown_bank_follows_set_requires_grad(enable):
    pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig())
    pm.base_model.set_requires_grad("default", requires_grad=enable)
    layer = edit_layers(pm)[0]
    add_random_clusters(layer, "default", 1)
    assert layer.persedit_A["default"].requires_grad is enable
    assert layer.persedit_B["default"].requires_grad is enable


def test_an_inference_mode_adapter_stays_frozen_when_its_bank_grows():
    pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(inference_mode=True))
    layer = edit_layers(pm)[0]
    add_random_clusters(layer, "default", 1)
    assert not any(p.requires_grad for p in layer.parameters())
