"""Saving and loading PERSEDIT adapters: a fresh process reloads bit-identically; every loading entry point."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
import transformers
import transformers.integrations.peft
from helpers import IDS, add_random_clusters, edit_layers
from packaging import version
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from tiny_models import TINY_ARCHS, make_tiny_model
from transformers import AutoModelForCausalLM

import peft_persedit
from peft_persedit import PersonalizationEditConfig

MANY = (7, 0, 1000, 3)  # clusters per layer (layers 0..3): 1000 on one layer, none on another
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CASES = [(arch, "fp32", counts) for arch in TINY_ARCHS for counts in ((0,), (1,), MANY)]
CASES += [(arch, dtype, MANY) for arch in ("llama", "gpt2") for dtype in ("fp16", "bf16")]


def case_id(arch: str, dtype: str, counts: tuple[int, ...]) -> str:
    return f"{arch}-{dtype}-{'many' if counts == MANY else counts[0]}"


def save_case(root: Path, arch: str, dtype: str, counts: tuple[int, ...]) -> dict:
    """Save the base model and an adapter with ``counts`` clusters per layer; return what a reload must give."""
    base_dir = root / f"base-{arch}-{dtype}"
    if not base_dir.exists():
        make_tiny_model(arch, dtype=DTYPES[dtype]).save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=DTYPES[dtype]).eval()
    pm = get_peft_model(model, PersonalizationEditConfig(layers_to_transform=list(range(len(counts)))))
    base_out = pm(IDS).logits
    for layer, n in zip(edit_layers(pm), counts):
        if n:
            add_random_clusters(layer, "default", n, tau=0.0 if n < 1000 else 0.3, seed=n)
    out = pm(IDS).logits
    assert torch.equal(out, base_out) == (sum(counts) == 0)  # the clusters do change the output
    adapter_dir = root / case_id(arch, dtype, counts)
    pm.save_pretrained(adapter_dir)
    torch.save(out, adapter_dir / "reference_logits.pt")
    return {"base": str(base_dir), "adapter": str(adapter_dir), "dtype": dtype,
            "summary": pm.base_model.bank_summary()}


LOAD_ALL = textwrap.dedent("""
    import json, sys, torch
    import peft_persedit
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor(json.loads(sys.argv[2]))
    results = {}
    for name, case in json.loads(open(sys.argv[1]).read()).items():
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[case["dtype"]]
        model = AutoModelForCausalLM.from_pretrained(case["base"], dtype=dtype).eval()
        pm = PeftModel.from_pretrained(model, case["adapter"])
        reference = torch.load(case["adapter"] + "/reference_logits.pt")
        same = torch.equal(pm(ids).logits, reference)
        results[name] = "ok" if same and pm.base_model.bank_summary() == case["summary"] else "DIFFERENT"
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def fresh_process_reloads(tmp_path_factory):
    """Save every case, then reload all of them in one fresh Python process; ``{case id: "ok" | why not}``."""
    root = tmp_path_factory.mktemp("saved")
    cases = {case_id(*case): save_case(root, *case) for case in CASES}
    (root / "cases.json").write_text(json.dumps(cases))
    result = subprocess.run([sys.executable, "-c", LOAD_ALL, str(root / "cases.json"), json.dumps(IDS.tolist())],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [case_id(*c) for c in CASES])
def test_fresh_process_reload_is_bit_identical(fresh_process_reloads, case):
    assert fresh_process_reloads[case] == "ok"


def save_llama_adapter(tmp_path: Path, model: torch.nn.Module, clusters: int = 5, name: str = "adapter") -> Path:
    pm = get_peft_model(model, PersonalizationEditConfig(gate="soft"))
    add_random_clusters(edit_layers(pm)[0], "default", clusters, seed=clusters)
    pm.save_pretrained(tmp_path / name)
    torch.save(pm(IDS).logits, tmp_path / name / "reference_logits.pt")
    return tmp_path / name


def test_peft_and_persedit_loaders(tmp_path, saved_tiny_base):
    adapter = save_llama_adapter(tmp_path, saved_tiny_base)
    out = torch.load(adapter / "reference_logits.pt")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "PERSEDIT" and config["base_model_name_or_path"] == str(tmp_path / "base")
    assert torch.equal(AutoPeftModelForCausalLM.from_pretrained(adapter)(IDS).logits, out)
    assert torch.equal(peft_persedit.from_pretrained(make_tiny_model("llama"), adapter)(IDS).logits, out)
    lazy = PeftModel.from_pretrained(make_tiny_model("llama"), adapter, low_cpu_mem_usage=True)
    assert torch.equal(lazy(IDS).logits, out)
    trainable = PeftModel.from_pretrained(make_tiny_model("llama"), adapter, is_trainable=True)
    assert {n.split(".")[-2] for n, p in trainable.named_parameters() if p.requires_grad} == {
        "persedit_A", "persedit_B"}
    frozen = PeftModel.from_pretrained(make_tiny_model("llama"), adapter)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_transformers_load_adapter(tmp_path, tiny_llama):
    adapter = save_llama_adapter(tmp_path, make_tiny_model("llama"))
    tiny_llama.load_adapter(str(adapter), adapter_name="bob")  # loads with any supported peft
    assert torch.equal(tiny_llama(IDS).logits, torch.load(adapter / "reference_logits.pt"))
    needed = getattr(transformers.integrations.peft, "MIN_PEFT_VERSION", "0")
    if version.parse(peft.__version__) < version.parse(needed):
        pytest.skip(f"transformers {transformers.__version__}'s active_adapters() & co. need peft >= {needed}")
    assert tiny_llama.active_adapters() == ["bob"]


def test_load_set_delete_and_disable_adapters(tmp_path):
    plain = make_tiny_model("llama")(IDS).logits
    alice = save_llama_adapter(tmp_path, make_tiny_model("llama"), clusters=3, name="alice")
    bob = save_llama_adapter(tmp_path, make_tiny_model("llama"), clusters=9, name="bob")
    pm = peft_persedit.from_pretrained(make_tiny_model("llama"), alice, adapter_name="alice")
    pm.load_adapter(bob, adapter_name="bob")
    assert pm.active_adapter == "alice"
    assert torch.equal(pm(IDS).logits, torch.load(alice / "reference_logits.pt"))
    pm.set_adapter("bob")
    assert torch.equal(pm(IDS).logits, torch.load(bob / "reference_logits.pt"))
    with pm.disable_adapter():
        assert torch.equal(pm(IDS).logits, plain)
    assert torch.equal(pm(IDS).logits, torch.load(bob / "reference_logits.pt"))
    pm.set_adapter("alice")
    pm.delete_adapter("bob")
    assert "bob" not in pm.peft_config and pm.base_model.loaded_adapters() == ["alice"]
    assert all("bob" not in name for name in pm.state_dict())
    assert torch.equal(pm(IDS).logits, torch.load(alice / "reference_logits.pt"))


def test_saved_config_records_each_adapters_own_bank_sizes(tmp_path):
    pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(), adapter_name="alice")
    pm.add_adapter("bob", PersonalizationEditConfig(layers_to_transform=[1, 2]))
    add_random_clusters(edit_layers(pm)[0], "alice", 2)
    add_random_clusters(edit_layers(pm)[2], "bob", 4, keys_per=3, rank=1)
    pm.save_pretrained(tmp_path)
    sizes = {name: json.loads((tmp_path / name / "adapter_config.json").read_text())["bank_sizes"]
             for name in ("alice", "bob")}
    assert sizes == {"alice": {"model.layers.0.mlp.down_proj": [4, 2, 4]},
                     "bob": {"model.layers.1.mlp.down_proj": [0, 0, 0], "model.layers.2.mlp.down_proj": [12, 4, 4]}}
