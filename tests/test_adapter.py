"""The PERSEDIT adapter type on tiny models of every architecture: wrap, gate, save/load, batches, merge."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import add_random_clusters, edit_layers, layer_input
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from peft.utils import PeftType
from tiny_models import TINY_ARCHS, make_tiny_model
from transformers.pytorch_utils import Conv1D

import peft_persedit
from peft_persedit import PersonalizationEditConfig

IDS = torch.tensor([[5, 17, 99, 42, 7, 81, 23], [9, 44, 3, 120, 66, 12, 200]])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_architecture_wraps_mlp_output_and_empty_bank_is_exact(arch):
    model = make_tiny_model(arch)
    base = model(IDS).logits
    pm = get_peft_model(model, PersonalizationEditConfig())
    layers = edit_layers(pm)
    assert len(layers) == 1
    assert isinstance(layers[0].get_base_layer(), (torch.nn.Linear, Conv1D))
    assert layers[0].in_features > layers[0].out_features  # the MLP *output* projection (64 → 32)
    assert torch.equal(pm(IDS).logits, base)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_gate_fires_only_near_its_key(arch):
    pm = get_peft_model(make_tiny_model(arch), PersonalizationEditConfig())
    base = pm(IDS).logits.detach()
    layer = edit_layers(pm)[0]
    x = layer_input(pm, layer, IDS)[0]  # row 0, [S, d_in]
    key = x[3]
    cos = torch.nn.functional.cosine_similarity(x, key[None], dim=-1)
    others = torch.cat([cos[:3], cos[4:]])
    tau = float((others.max() + 1.0) / 2)  # between every other token and the key token itself
    layer.add_clusters("default", keys=key[None], key_cluster=torch.tensor([0]), tau=torch.tensor([tau]),
                       A=torch.randn(1, layer.in_features), B=torch.randn(layer.out_features, 1),
                       rank_cluster=torch.tensor([0]))
    out = pm(IDS).logits.detach()
    assert torch.equal(out[0, :3], base[0, :3])  # before the key token: untouched
    assert not torch.allclose(out[0, 3], base[0, 3])  # the key token fires
    x1 = layer_input(pm, layer, IDS)[1]
    if bool((torch.nn.functional.cosine_similarity(x1, key[None], dim=-1) < tau).all()):
        assert torch.equal(out[1], base[1])  # no token of row 1 is near the key: row 1 untouched


def test_soft_gate_and_ungated_modes(tiny_llama):
    for gate in ("soft", "none"):
        pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(gate=gate))
        base = pm(IDS).logits.detach()
        add_random_clusters(edit_layers(pm)[0], "default", 3, tau=0.0 if gate == "soft" else 0.99)
        assert not torch.allclose(pm(IDS).logits, base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_forward_and_moves(dtype):
    pm = get_peft_model(make_tiny_model("llama", dtype=dtype), PersonalizationEditConfig(gate="soft"))
    add_random_clusters(edit_layers(pm)[0], "default", 4)
    out = pm(IDS).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    pm.to(torch.float32).to("cpu")
    layer = edit_layers(pm)[0]
    assert layer.persedit_A["default"].dtype == torch.float32
    assert layer.persedit_key_cluster["default"].dtype == torch.long
    assert torch.isfinite(pm(IDS).logits).all()


def test_trainable_parameters_follow_config():
    pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(init_clusters=2, init_rank=3))
    layer = edit_layers(pm)[0]
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".persedit_A." in n or ".persedit_B." in n for n in trainable)
    expected = 2 * 3 * (layer.in_features + layer.out_features)
    assert sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad) == expected
    pm2 = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(init_clusters=1, trainable=["B"]))
    assert all(".persedit_B." in n for n, p in pm2.named_parameters() if p.requires_grad)
    assert all("persedit_tau" not in n for n, _ in pm.named_parameters())  # buffers are never parameters


def _save_base_and_adapter(tmp_path, counts, arch="llama", gate="hard"):
    model = make_tiny_model(arch)
    model.save_pretrained(tmp_path / "base")
    layers = list(range(len(counts)))
    pm = get_peft_model(model, PersonalizationEditConfig(layers_to_transform=layers, gate=gate))
    pm.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    for layer, n in zip(edit_layers(pm), counts):
        if n:
            add_random_clusters(layer, "default", n, tau=0.0 if n < 1000 else 0.3)
    out = pm(IDS).logits.detach()
    pm.save_pretrained(tmp_path / "adapter")
    torch.save({"ids": IDS, "out": out}, tmp_path / "ref.pt")
    return pm, out


LOAD_SCRIPT = textwrap.dedent("""
    import sys, torch
    import peft_persedit
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    root = sys.argv[1]
    ref = torch.load(root + "/ref.pt")
    model = AutoModelForCausalLM.from_pretrained(root + "/base").eval()
    pm = PeftModel.from_pretrained(model, root + "/adapter")
    assert torch.equal(pm(ref["ids"]).logits, ref["out"]), "outputs differ after reload"
    print("BIT-IDENTICAL", pm.base_model.bank_summary())
""")


@pytest.mark.parametrize("counts", [(0,), (1,), (7, 0, 1000)], ids=["0", "1", "many"])
def test_save_load_in_fresh_process_is_bit_identical(tmp_path, counts):
    _save_base_and_adapter(tmp_path, counts)
    result = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "BIT-IDENTICAL" in result.stdout


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "gptj", "phi3"])
def test_save_load_other_architectures(tmp_path, arch):
    pm, out = _save_base_and_adapter(tmp_path, (3,), arch=arch)
    fresh = PeftModel.from_pretrained(make_tiny_model(arch), tmp_path / "adapter")
    assert torch.equal(fresh(IDS).logits, out)


def test_all_loading_entry_points(tmp_path):
    pm, out = _save_base_and_adapter(tmp_path, (5,))
    assert torch.equal(AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")(IDS).logits, out)
    assert torch.equal(peft_persedit.from_pretrained(make_tiny_model("llama"), tmp_path / "adapter")(IDS).logits, out)
    model = make_tiny_model("llama")
    model.load_adapter(str(tmp_path / "adapter"), adapter_name="bob")  # transformers' own adapter loading
    assert torch.equal(model(IDS).logits, out)
    pm2 = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig())
    pm2.load_adapter(tmp_path / "adapter", adapter_name="bob")
    pm2.set_adapter("bob")
    assert torch.equal(pm2(IDS).logits, out)
    with pm2.disable_adapter():
        assert torch.equal(pm2(IDS).logits, make_tiny_model("llama")(IDS).logits)
    pm2.set_adapter("default")
    pm2.delete_adapter("bob")
    assert "bob" not in pm2.peft_config and "bob" not in edit_layers(pm2)[0].persedit_A


def test_mixed_user_batch_equals_per_row_and_composition(tmp_path):
    pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(gate="soft"), adapter_name="alice")
    pm.add_adapter("bob", PersonalizationEditConfig(gate="soft"))
    add_random_clusters(edit_layers(pm)[0], "alice", 3, seed=1)
    add_random_clusters(edit_layers(pm)[0], "bob", 5, seed=2)
    pm.eval()
    ids = torch.cat([IDS, IDS[:1]])
    mixed = pm(ids, adapter_names=["alice", "bob", "__base__"]).logits
    singles = []
    for row, name in enumerate(["alice", "bob"]):
        pm.set_adapter(name)
        singles.append(pm(ids[row:row + 1]).logits)
    with pm.disable_adapter():
        singles.append(pm(ids[2:3]).logits)
    assert torch.allclose(mixed, torch.cat(singles), atol=1e-5)
    pm.base_model.set_adapter(["alice", "bob"])
    both = pm(ids[:1]).logits
    assert torch.allclose(pm(ids[:1], adapter_names=["alice+bob"]).logits, both, atol=1e-5)
    gen = pm.generate(input_ids=ids, adapter_names=["alice", "bob", "__base__"], max_new_tokens=3, do_sample=False)
    pm.set_adapter("bob")
    assert torch.equal(gen[1:2], pm.generate(input_ids=ids[1:2], max_new_tokens=3, do_sample=False))
    with pytest.raises(ValueError, match="unknown adapter"):
        pm(ids, adapter_names=["alice", "carol", "__base__"])


def test_merge_semantics():
    pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(gate="none"))
    add_random_clusters(edit_layers(pm)[0], "default", 3, scale=0.1)
    for layer in edit_layers(pm):
        layer.persedit_shift["default"].data.zero_()  # llama's down_proj has no bias to take shifts
    out = pm(IDS).logits.detach()
    merged = pm.merge_and_unload()
    assert torch.allclose(merged(IDS).logits, out, atol=1e-5)
    gated = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig())
    empty_merge = gated.merge_and_unload()  # no clusters: merging is exact
    assert torch.equal(empty_merge(IDS).logits, make_tiny_model("llama")(IDS).logits)
    gated = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig())
    add_random_clusters(edit_layers(gated)[0], "default", 1)
    with pytest.raises(ValueError, match="input"):
        gated.merge_and_unload()


def test_peft_type_is_a_real_enum_member_and_registration_is_idempotent():
    assert PeftType("PERSEDIT") is PeftType.PERSEDIT is PeftType["PERSEDIT"]
    assert PeftType.PERSEDIT in list(PeftType)
    peft_persedit.register()
    peft_persedit.register()
    from peft_persedit.registration import add_enum_member

    assert add_enum_member(PeftType, "PERSEDIT", "PERSEDIT") is PeftType.PERSEDIT


@pytest.mark.parametrize("version", ["3.10.13", "3.12.1", "3.13.0"])
def test_enum_extension_on_other_pythons(version):
    import inspect
    from pathlib import Path

    from peft_persedit.registration import add_enum_member

    python = Path(f"/root/.pyenv/versions/{version}/bin/python3")
    if not python.exists():
        pytest.skip(f"Python {version} not installed")
    code = "import enum\n" + inspect.getsource(add_enum_member) + textwrap.dedent("""
        class T(str, enum.Enum):
            A = "A"
        m = add_enum_member(T, "NEW", "NEW")
        assert add_enum_member(T, "NEW", "NEW") is m
        assert T("NEW") is m is T["NEW"] is T.NEW and m in list(T) and m == "NEW" and isinstance(m, T)
        print("OK")
    """)
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "OK", result.stderr


def test_clear_errors(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    odd = AutoModelForCausalLM.from_config(AutoConfig.for_model("opt", vocab_size=64, hidden_size=16, ffn_dim=32,
                                                                num_hidden_layers=2, num_attention_heads=2,
                                                                word_embed_proj_dim=16))
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(odd, PersonalizationEditConfig())
    with pytest.raises((TypeError, ValueError), match="Linear"):
        get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(target_modules=["act_fn"]))
    with pytest.raises(ValueError, match="out of range"):
        get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(layers_to_transform=[9]))
    with pytest.raises(ValueError, match="reserved"):
        get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(), adapter_name="__base__")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        peft_persedit.from_pretrained(make_tiny_model("llama"), tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        peft_persedit.from_pretrained(make_tiny_model("llama"), tmp_path / "empty")
    from peft import LoraConfig

    get_peft_model(make_tiny_model("llama"), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="not a PERSEDIT adapter"):
        peft_persedit.from_pretrained(make_tiny_model("llama"), tmp_path / "lora")
    pm, _ = _save_base_and_adapter(tmp_path, (2,))
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter weights"):
        peft_persedit.from_pretrained(make_tiny_model("llama"), tmp_path / "adapter")


def test_shape_mismatch_on_load_names_the_cause(tmp_path):
    pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig())
    add_random_clusters(edit_layers(pm)[0], "default", 2)
    pm.save_pretrained(tmp_path / "a")
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2)
    other = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises((ValueError, RuntimeError), match="d_in=48|size mismatch"):
        PeftModel.from_pretrained(other, tmp_path / "a")
