"""Mistakes are refused with messages that name the cause."""

from __future__ import annotations

import pytest
import torch
from helpers import add_random_clusters, edit_layers
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import make_tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

import peft_persedit
from peft_persedit import PersonalizationEditConfig


def tiny(model_type: str = "llama", **sizes) -> torch.nn.Module:
    defaults = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**defaults, **sizes}))


def test_unknown_architecture_needs_target_modules():
    opt = tiny("opt", ffn_dim=32, word_embed_proj_dim=32)
    with pytest.raises(ValueError, match=r"no default target for architecture 'opt'.*target_modules"):
        get_peft_model(opt, PersonalizationEditConfig())
    config = PersonalizationEditConfig(target_modules=["fc2"])
    pm = get_peft_model(tiny("opt", ffn_dim=32, word_embed_proj_dim=32), config)
    assert list(pm.base_model.edit_layers()) == ["model.decoder.layers.0.fc2"]


@pytest.mark.parametrize(("target", "kind"), [("act_fn", "SiLU(Activation)?"),  # SiLU before transformers 5
                                              ("embed_tokens", "Embedding"),
                                              ("mlp", "LlamaMLP")])
def test_target_must_be_linear_or_conv1d(target, kind):
    with pytest.raises(TypeError, match=rf"cannot wrap '.*{target}'.*nn.Linear or transformers Conv1D.*got {kind}"):
        get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(target_modules=[target]))


@pytest.mark.parametrize("layers", [[4], [-1], [0, 9]])
def test_layer_index_out_of_range(layers):
    with pytest.raises(ValueError, match=r"out of range: the model has 4 layers \(0..3\)"):
        get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(layers_to_transform=layers))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"gate": "sometimes"}, "gate must be"), ({"gate_temperature": 0}, "gate_temperature"),
    ({"trainable": ["A", "W"]}, r"unknown tensors \['W'\]"), ({"init_rank": 0}, "init_rank"),
    ({"false_fire_rate": 1.5}, "false_fire_rate"),
])
def test_invalid_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PersonalizationEditConfig(**kwargs)


def test_incomplete_adapter_directories(tmp_path):
    model = make_tiny_model("llama")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        peft_persedit.from_pretrained(model, tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        peft_persedit.from_pretrained(model, tmp_path / "empty")
    pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig())
    add_random_clusters(edit_layers(pm)[0], "default", 2)
    pm.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter weights"):
        peft_persedit.from_pretrained(model, tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed JSON"):
        peft_persedit.from_pretrained(model, tmp_path / "adapter")


def test_a_lora_adapter_is_not_a_persedit_adapter(tmp_path):
    get_peft_model(make_tiny_model("llama"), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="peft_type is 'LORA', expected 'PERSEDIT'.*not a PERSEDIT adapter"):
        peft_persedit.from_pretrained(make_tiny_model("llama"), tmp_path)


@pytest.mark.parametrize(("sizes", "tensor"), [({"intermediate_size": 48}, "persedit_A"),
                                               ({"hidden_size": 48}, "persedit_B")])
def test_shape_mismatch_on_load_names_the_cause(tmp_path, sizes, tensor):
    pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig())
    add_random_clusters(edit_layers(pm)[0], "default", 2)
    pm.save_pretrained(tmp_path)
    message = rf"size mismatch for .*{tensor}.*this model's layer has d_in=.*another base model"
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(tiny(**sizes), tmp_path)
    with pytest.raises(ValueError, match=message):
        peft_persedit.from_pretrained(tiny(**sizes), tmp_path)
