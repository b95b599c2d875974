"""The PERSEDIT adapter on tiny models of every architecture: wrapping, gating, dtypes, trainability, merging."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import IDS, add_keyed_cluster, add_random_clusters, edit_layers, layer_io, threshold_between
from peft import get_peft_model
from tiny_models import TINY_ARCHS, make_tiny_model
from torch.nn.functional import cosine_similarity
from transformers.pytorch_utils import Conv1D

from peft_persedit import PersEditLinear, PersonalizationEditConfig

#: arch → the module a default config edits (the MLP output projection of layer ⌊0.17·4⌋ = 0)
DEFAULT_TARGET = {
    "llama": "model.layers.0.mlp.down_proj", "mistral": "model.layers.0.mlp.down_proj",
    "qwen2": "model.layers.0.mlp.down_proj", "qwen3": "model.layers.0.mlp.down_proj",
    "gemma": "model.layers.0.mlp.down_proj", "olmo2": "model.layers.0.mlp.down_proj",
    "phi3": "model.layers.0.mlp.down_proj", "gpt2": "transformer.h.0.mlp.c_proj",
    "gpt_neox": "gpt_neox.layers.0.mlp.dense_4h_to_h", "gptj": "transformer.h.0.mlp.fc_out",
}


def wrap(arch: str = "llama", dtype: torch.dtype = torch.float32, **config):
    return get_peft_model(make_tiny_model(arch, dtype=dtype), PersonalizationEditConfig(**config))


def test_default_config_wraps_the_mlp_output_and_an_empty_bank_is_exact(tiny_model):
    arch = tiny_model.config.model_type
    base = tiny_model(IDS).logits
    pm = get_peft_model(tiny_model, PersonalizationEditConfig())
    assert list(pm.base_model.edit_layers()) == [DEFAULT_TARGET[arch]]
    layer = edit_layers(pm)[0]
    assert isinstance(layer.get_base_layer(), Conv1D if arch == "gpt2" else torch.nn.Linear)
    assert (layer.in_features, layer.out_features) == (64, 32)  # intermediate → hidden
    assert torch.equal(pm(IDS).logits, base)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_hard_gate_fires_exactly_where_cos_reaches_tau(arch):
    pm = wrap(arch)
    layer = edit_layers(pm)[0]
    base = pm(IDS).logits
    x, delta = layer_io(pm, layer, IDS)
    assert not delta.any()
    key = x[0, 3]  # row 0, token 3
    cos = cosine_similarity(x.float(), key.float(), dim=-1)  # [B, S]
    tau = threshold_between(cos)
    fires = cos >= tau
    assert fires[0, 3] and fires.sum() >= 2 and not fires.all()
    add_keyed_cluster(layer, "default", key, tau)
    _, delta = layer_io(pm, layer, IDS)
    assert torch.equal(delta.abs().amax(-1) > 0, fires)  # the edit lands at exactly the near tokens
    out = pm(IDS).logits
    for row in range(IDS.shape[0]):
        first = int(fires[row].float().argmax()) if fires[row].any() else IDS.shape[1]
        assert torch.equal(out[row, :first], base[row, :first])  # causal: untouched before the first hit
        if first < IDS.shape[1]:
            assert not torch.allclose(out[row, first], base[row, first])


def test_gate_centres_inputs_before_the_cosine():
    pm = wrap()
    layer = edit_layers(pm)[0]
    x, _ = layer_io(pm, layer, IDS)
    mu = x.reshape(-1, x.shape[-1]).mean(0)
    layer.set_center("default", mu)
    cos = cosine_similarity(x - mu, x[1, 2] - mu, dim=-1)
    tau = threshold_between(cos, min_above=1)
    add_keyed_cluster(layer, "default", x[1, 2], tau)  # keys are centred with μ on insertion
    _, delta = layer_io(pm, layer, IDS)
    assert torch.equal(delta.abs().amax(-1) > 0, cos >= tau)
    with pytest.raises(ValueError, match="before any keyed cluster"):
        layer.set_center("default", mu)


@pytest.mark.parametrize("gate", ["soft", "none"])
def test_soft_and_ungated_deltas_follow_the_formula(gate):
    pm = wrap(gate=gate, gate_temperature=0.1)
    layer = edit_layers(pm)[0]
    x, _ = layer_io(pm, layer, IDS)
    key = x[0, 3]
    add_keyed_cluster(layer, "default", key, tau=0.5, rank=2, seed=3)
    _, delta = layer_io(pm, layer, IDS)
    cos = cosine_similarity(x, key, dim=-1)
    g = torch.sigmoid((cos - 0.5) / 0.1) if gate == "soft" else torch.ones_like(cos)
    A, B = layer.persedit_A["default"], layer.persedit_B["default"]
    assert torch.allclose(delta, g[..., None] * (x @ A.T @ B.T), atol=1e-5)


def test_clusters_grow_and_shrink_by_whole_clusters():
    pm = wrap()
    layer = edit_layers(pm)[0]
    add_random_clusters(layer, "default", 3, rank=2, keys_per=2)
    assert layer.add_clusters("default", keys=torch.randn(1, 64), key_cluster=torch.tensor([0]),
                              tau=torch.tensor([0.9]), A=torch.randn(4, 64), B=torch.randn(32, 4),
                              rank_cluster=torch.zeros(4, dtype=torch.long)) == [3]
    assert pm.base_model.bank_summary() == {DEFAULT_TARGET["llama"]: {"clusters": 4, "keys": 7, "rank": 10}}
    layer.remove_clusters("default", [0, 3])
    assert pm.base_model.bank_summary() == {DEFAULT_TARGET["llama"]: {"clusters": 2, "keys": 4, "rank": 4}}
    assert layer.persedit_key_cluster["default"].tolist() == [0, 0, 1, 1]
    assert torch.allclose(layer.persedit_keys["default"].norm(dim=-1), torch.ones(4))
    with pytest.raises(ValueError, match="do not fit this layer"):
        layer.add_clusters("default", keys=torch.randn(1, 32), key_cluster=torch.tensor([0]), tau=torch.tensor([0.]),
                           A=torch.randn(1, 64), B=torch.randn(32, 1), rank_cluster=torch.tensor([0]))
    with pytest.raises(IndexError, match="out of range"):
        layer.remove_clusters("default", [5])


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(arch, dtype):
    pm = wrap(arch, dtype=dtype, gate="soft")
    base = make_tiny_model(arch, dtype=dtype)(IDS).logits
    assert torch.equal(pm(IDS).logits, base)
    add_random_clusters(edit_layers(pm)[0], "default", 4)
    out = pm(IDS).logits
    # the logits' dtype is the base model's (older transformers' gptj upcasts its logits to fp32)
    assert out.dtype == base.dtype and torch.isfinite(out).all() and not torch.equal(out, base)
    assert next(p for n, p in pm.named_parameters() if "persedit_" not in n).dtype == dtype


def test_to_dtype_and_device_moves_every_bank_tensor():
    pm = wrap(gate="soft")
    layer = edit_layers(pm)[0]
    add_random_clusters(layer, "default", 4)
    out = pm(IDS).logits
    pm.to(torch.bfloat16)
    floats = [t for n, t in layer.named_parameters() if "persedit_" in n]
    floats += [t for n, t in layer.named_buffers() if "persedit_tau" in n or "persedit_center" in n]
    assert len(floats) == 6 and all(t.dtype == torch.bfloat16 for t in floats)
    assert layer.persedit_key_cluster["default"].dtype == torch.long  # index buffers keep their dtype
    assert pm(IDS).logits.dtype == torch.bfloat16
    pm.to(torch.float32).to("cpu")
    assert torch.allclose(pm(IDS).logits, out, atol=0.1)
    pm.to("meta")  # a device move reaches parameters and (persistent) buffers alike
    assert all(t.device.type == "meta" for t in [*layer.parameters(), *layer.buffers()])


@pytest.mark.parametrize("trainable", [["A", "B"], ["B"], ["A", "B", "keys", "shift"]])
def test_trainable_parameters_follow_config_and_buffers_never_count(trainable, capsys):
    model = make_tiny_model("llama")
    n_base = sum(p.numel() for p in model.parameters())
    pm = get_peft_model(model, PersonalizationEditConfig(init_clusters=2, init_rank=3, trainable=trainable))
    layer = edit_layers(pm)[0]
    add_random_clusters(layer, "default", 5, rank=2, keys_per=2)
    sizes = {"A": 16 * 64, "B": 32 * 16, "keys": 10 * 64, "shift": 7 * 32}  # rank 2·3 + 5·2 = 16, 7 clusters
    trained = {n.split(".")[-2] for n, p in pm.named_parameters() if p.requires_grad}
    assert trained == {f"persedit_{t}" for t in trainable}
    pm.print_trainable_parameters()
    reported = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)", capsys.readouterr().out)
    counts = [int(group.replace(",", "")) for group in reported.groups()]
    assert counts == [sum(sizes[t] for t in trainable), n_base + sum(sizes.values())]
    assert all(n.split(".")[-2] not in ("persedit_tau", "persedit_center", "persedit_key_cluster",
                                        "persedit_rank_cluster") for n, _ in pm.named_parameters())


def test_init_clusters_always_fire_with_zero_delta():
    pm = wrap(init_clusters=2, init_rank=4)
    assert pm.base_model.bank_summary() == {DEFAULT_TARGET["llama"]: {"clusters": 2, "keys": 0, "rank": 8}}
    assert torch.equal(pm(IDS).logits, make_tiny_model("llama")(IDS).logits)
    layer = edit_layers(pm)[0]
    layer.persedit_B["default"].data.normal_()  # (.data bypasses the version counter; the cached bank sees it)
    _, delta = layer_io(pm, layer, IDS)
    assert (delta.abs().amax(-1) > 0).all()


def test_banks_made_and_used_under_inference_mode():
    pm = wrap(gate="soft")
    with torch.inference_mode():
        add_random_clusters(edit_layers(pm)[0], "default", 3)
        out = pm(IDS).logits
    assert not torch.equal(out, make_tiny_model("llama")(IDS).logits)


def test_a_config_reused_for_a_second_model_starts_empty():
    config = PersonalizationEditConfig()
    first = get_peft_model(make_tiny_model("llama"), config)
    add_random_clusters(edit_layers(first)[0], "default", 3)
    second = get_peft_model(make_tiny_model("llama"), config)
    assert second.base_model.bank_summary()[DEFAULT_TARGET["llama"]]["clusters"] == 0
    second.add_adapter("bob", config)  # one config object for two adapters of one model
    add_random_clusters(edit_layers(second)[0], "bob", 2)
    assert second.peft_config["bob"].bank_sizes[DEFAULT_TARGET["llama"]] == [4, 2, 4]
    assert second.peft_config["default"].bank_sizes[DEFAULT_TARGET["llama"]] == [0, 0, 0]
    assert first.peft_config["default"].bank_sizes[DEFAULT_TARGET["llama"]] == [6, 3, 6]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ungated_adapters_merge_exactly(arch):
    pm = wrap(arch, gate="none")
    add_random_clusters(edit_layers(pm)[0], "default", 3, scale=0.1)
    if arch == "llama":  # down_proj has no bias to take constant shifts
        with pytest.raises(ValueError, match="no bias"):
            pm.merge_adapter()
        edit_layers(pm)[0].persedit_shift["default"].data.zero_()
    out = pm(IDS).logits
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, PersEditLinear) for m in merged.modules())
    assert torch.allclose(merged(IDS).logits, out, atol=1e-5)


def test_gated_adapters_merge_only_when_input_independent():
    plain = make_tiny_model("llama")(IDS).logits
    assert torch.equal(wrap().merge_and_unload()(IDS).logits, plain)  # no clusters: merging is exact
    pm = wrap(init_clusters=1)  # an always-on cluster (τ = −∞) is input-independent too
    edit_layers(pm)[0].persedit_B["default"].data.normal_(std=0.1)
    assert torch.allclose(pm.merge_and_unload()(IDS).logits, pm(IDS).logits, atol=1e-5)
    pm = wrap()
    add_random_clusters(edit_layers(pm)[0], "default", 1)
    with pytest.raises(ValueError, match="depends on the input"):
        pm.merge_and_unload()
    with pytest.raises(ValueError, match="depends on the input"):
        pm.merge_adapter()
    assert torch.equal(pm.unload()(IDS).logits, plain)
