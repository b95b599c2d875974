"""Mixed-user batches: each row runs with its own adapter (``adapter_names``), compositions ``"a+b"``, generate."""

from __future__ import annotations

import pytest
import torch
from helpers import IDS, add_keyed_cluster, add_random_clusters, edit_layers, layer_input, threshold_between
from peft import get_peft_model
from tiny_models import make_tiny_model
from torch.nn.functional import cosine_similarity

from peft_persedit import PersonalizationEditConfig

ROWS = torch.cat([IDS, IDS.flip(0), IDS[:1]])  # 5 rows of 7 tokens


@pytest.fixture
def two_users():
    """alice: hard-gated, layer 0, keyed on real tokens; bob: soft-gated, layers 1–2; both fire on ROWS."""
    pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(), adapter_name="alice")
    pm.add_adapter("bob", PersonalizationEditConfig(gate="soft", layers_to_transform=[1, 2]))
    alice_layer = pm.base_model.edit_layers()["model.layers.0.mlp.down_proj"]
    x = layer_input(pm, alice_layer, ROWS)
    for seed, (row, token) in enumerate([(0, 3), (1, 5)]):
        cos = cosine_similarity(x, x[row, token], dim=-1)
        add_keyed_cluster(alice_layer, "alice", x[row, token], threshold_between(cos), rank=2, seed=seed)
    for seed, layer in enumerate(edit_layers(pm)[1:]):
        add_random_clusters(layer, "bob", 4, tau=0.1, seed=seed)
    return pm.eval()


def run_alone(pm, ids: torch.Tensor, adapter: str, **generate) -> torch.Tensor:
    """Logits (or generated ids) of ``ids`` with only ``adapter`` active (``__base__``: adapters disabled)."""
    def run():
        return pm.generate(input_ids=ids, **generate) if generate else pm(ids).logits

    if adapter == "__base__":
        with pm.disable_adapter():
            return run()
    pm.base_model.set_adapter(adapter.split("+"))
    return run()


NAMES = ["alice", "bob", "__base__", "alice+bob", "bob"]


def test_mixed_batch_equals_each_row_alone(two_users):
    pm = two_users
    mixed = pm(ROWS, adapter_names=NAMES).logits
    alone = torch.cat([run_alone(pm, ROWS[i:i + 1], name) for i, name in enumerate(NAMES)])
    assert torch.allclose(mixed, alone, atol=1e-5)
    plain = make_tiny_model("llama")(ROWS).logits
    for i, name in enumerate(NAMES):  # every user's edits matter (and __base__ is the plain model)
        assert torch.equal(mixed[i], plain[i]) == (name == "__base__")


def test_composition_equals_both_adapters_active(two_users):
    pm = two_users
    pm.base_model.set_adapter(["alice", "bob"])
    both = pm(ROWS).logits
    assert torch.allclose(pm(ROWS, adapter_names=["alice+bob"] * len(ROWS)).logits, both, atol=1e-5)
    pm.base_model.set_adapter("alice")
    assert not torch.allclose(pm(ROWS).logits, both)


def test_generate_with_adapter_names_equals_each_row_alone(two_users):
    pm = two_users
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=2)
    mixed = pm.generate(input_ids=ROWS, adapter_names=NAMES, **options)
    for i, name in enumerate(NAMES):
        assert torch.equal(mixed[i:i + 1], run_alone(pm, ROWS[i:i + 1], name, **options)), name


def test_adapter_names_errors(two_users):
    pm = two_users
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['carol'\]"):
        pm(ROWS, adapter_names=["alice", "carol", "__base__", "bob", "bob"])
    with pytest.raises(ValueError, match="5 rows"):
        pm(ROWS, adapter_names=["alice", "bob"])
    pm.train()
    with pytest.raises(ValueError, match="training mode"):
        pm(ROWS, adapter_names=NAMES)


def test_adapter_names_refused_while_merged():
    pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(gate="none"))
    add_random_clusters(edit_layers(pm)[0], "default", 2)
    edit_layers(pm)[0].persedit_shift["default"].data.zero_()
    pm.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        pm(IDS, adapter_names=["default", "__base__"])
    pm.unmerge_adapter()
    assert torch.allclose(pm(IDS, adapter_names=["default", "__base__"]).logits[1],
                          make_tiny_model("llama")(IDS).logits[1], atol=1e-5)


def test_base_is_a_reserved_adapter_name():
    with pytest.raises(ValueError, match="reserved"):
        get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(), adapter_name="__base__")
    pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig())
    with pytest.raises(ValueError, match="reserved"):
        pm.add_adapter("__base__", PersonalizationEditConfig())
