"""Representation edits (CHAMELEON-style): the maths on synthetic data, the edit end to end on a tiny model,
save/load, mixed batches, forget, the CLI, and a small run on the embedded model (real_model)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import edit_layers, layer_io
from peft import PeftModel, get_peft_model
from tiny_models import make_tiny_model, tiny_tokenizer

from peft_persedit import PersonalizationEditConfig
from peft_persedit.editing import PersonalizationEditor
from peft_persedit.editing.chat import chat_text, encode, subject_token_index
from peft_persedit.editing.representation import (
    Texts,
    add_shift_cluster,
    always_on,
    block_index,
    choose_alpha,
    preference_shift,
    response_log_likelihood,
)
from peft_persedit.preferences import Preference

PREFS = [
    Preference("hobby", "What's my hobby?", "Dancing", text="I love dancing at the club."),
    Preference("pet", "What's my pet?", "A turtle"),
    Preference("city", "Which city do I live in?", "Oslo"),
]
FAST = dict(fit_prompts=2, select_prompts=1, own_questions=1, max_new_tokens=4, alphas=(1.0,))


def tiny_pm(layers=(1, 2)):
    config = PersonalizationEditConfig(layers_to_transform=list(layers), synonyms=0, contexts=1, value_steps=3,
                                       mom2="none")
    return get_peft_model(make_tiny_model("llama"), config).eval()


def ids_of(tokenizer, *questions):
    seqs = [encode(tokenizer, chat_text(tokenizer, q)) for q in questions]
    width = max(map(len, seqs))
    return torch.tensor([s + [2] * (width - len(s)) for s in seqs])


def test_preference_shift_is_the_mean_difference_along_the_top_direction():
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(16), dim=0)
    scale = 2.0 + torch.rand(30)
    diffs = scale[:, None] * u + 0.01 * torch.randn(30, 16)
    shift = preference_shift(diffs)
    assert torch.allclose(shift, scale.mean() * u, atol=0.02)
    assert torch.allclose(preference_shift(-diffs), -shift, atol=1e-5)  # SVD's sign never matters
    full = preference_shift(diffs, rank=16)
    assert torch.allclose(full, diffs.mean(0), atol=1e-4)  # all directions: the plain mean difference
    neutral = torch.randn(8, 16)
    n = torch.linalg.svd(neutral.double(), full_matrices=False).Vh[0].float()
    assert abs(float(preference_shift(diffs, neutral) @ n)) < 1e-4


def test_choose_alpha_needs_a_real_improvement_and_block_index():
    alphas = (0.0, 1.0, 2.0)
    assert choose_alpha(torch.tensor([-3.0, -2.0, -2.5]), alphas) == 1
    assert choose_alpha(torch.tensor([-2.0, -2.0, -2.0]), alphas) == 0
    assert choose_alpha(torch.tensor([-2.0, -1.0, -1.0]), (2.0, 0.0, 1.0)) == 1  # ties go to the smaller α
    assert block_index("base_model.model.model.layers.12.mlp.down_proj") == 12
    assert block_index("transformer.h.3.mlp.c_proj") == 3
    with pytest.raises(ValueError, match="decoder block"):
        block_index("lm_head")


def test_a_shift_cluster_lands_in_the_residual_stream_after_its_block(tokenizer):
    pm = tiny_pm(layers=(1,))
    layer = edit_layers(pm)[0]
    shift = torch.randn(layer.out_features)
    add_shift_cluster(layer, "default", always_on(layer.in_features), shift)
    assert layer.persedit_A["default"].shape[0] == 0 and torch.isneginf(layer.persedit_tau["default"]).all()
    ids = ids_of(tokenizer, "What's my pet?")
    with torch.no_grad():
        edited = pm(input_ids=ids, output_hidden_states=True).hidden_states
        with pm.disable_adapter():
            base = pm(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.allclose(edited[1], base[1]) and torch.allclose(edited[2] - base[2], shift.expand_as(base[2]),
                                                                 atol=1e-5)


def test_log_likelihood_routes_rows(tokenizer):
    pm = tiny_pm(layers=(1,))
    layer = edit_layers(pm)[0]
    add_shift_cluster(layer, "default", always_on(layer.in_features), torch.randn(layer.out_features) * 3)
    seqs = [encode(tokenizer, "ab cd ef")] * 2
    texts = Texts(seqs, [(2, len(seqs[0]) - 1)] * 2)
    ll = response_log_likelihood(pm, texts, pad=2, adapters=["default", "__base__"])
    with pm.disable_adapter():
        base = response_log_likelihood(pm, texts, pad=2)
    assert torch.allclose(ll[1], base[1]) and not torch.allclose(ll[0], base[0])


def test_edit_save_load_batch_and_forget(tokenizer, tmp_path):
    pm = tiny_pm()
    editor = PersonalizationEditor(pm, tokenizer, progress=False)
    report = editor.edit_users({"alice": PREFS[:2], "bob": PREFS[2:]}, verify=False, method="representation",
                               gate="always", **FAST)
    assert set(report.timings) >= {"generate", "directions", "alpha"} and len(report.results) == 3
    for layer in edit_layers(pm):
        bank = layer.bank("alice")
        assert bank.A.shape[0] == 0 and bank.keys.shape[0] == 0 and torch.isneginf(bank.tau).all()
        assert bool((bank.shift.norm(dim=-1) > 0).any())  # (zero where a random model's two answers coincide)
    entries = pm.peft_config["alice"].preferences
    assert [e["kind"] for e in entries] == ["representation"] * 2 and entries[0]["alpha"] == 1.0
    alice = PersonalizationEditor(pm, tokenizer, adapter_name="alice", progress=False)
    assert [p.id for p in alice.preferences] == [p.id for p in PREFS[:2]]
    ids = ids_of(tokenizer, "What's my pet?", "Hello there", "What's my pet?")
    names = ["alice", "bob", "__base__"]
    mixed = pm(ids, adapter_names=names).logits.detach()
    with pm.disable_adapter():
        base = pm(ids).logits.detach()
    assert torch.allclose(mixed[2], base[2]) and not torch.allclose(mixed[0], base[0])
    pm.save_pretrained(tmp_path, selected_adapters=["alice", "bob"])
    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path / "alice", adapter_name="alice")
    loaded.load_adapter(tmp_path / "bob", adapter_name="bob")
    assert torch.allclose(loaded.eval()(ids, adapter_names=names).logits, mixed, atol=1e-5)
    assert json.loads((tmp_path / "alice" / "adapter_config.json").read_text())["preferences"][1]["kind"] == \
        "representation"
    before = {n: t.clone() for n, t in vars(edit_layers(pm)[0].bank("alice")).items() if torch.is_tensor(t)}
    alice.edit([PREFS[2]], verify=False, method="representation", gate="always", **FAST)
    alice.forget(PREFS[2].id)
    after = vars(edit_layers(pm)[0].bank("alice"))
    assert all(torch.equal(t, after[n]) for n, t in before.items())
    with pytest.raises(ValueError, match="already holds"):
        alice.edit([PREFS[0]], verify=False, method="representation", **FAST)
    with pytest.raises(ValueError, match="unknown edit method"):
        alice.edit([PREFS[2]], method="steer")


def test_new_adapter_from_a_loaded_template_starts_empty(tokenizer, tmp_path):
    pm = tiny_pm(layers=(1,))
    PersonalizationEditor(pm, tokenizer, progress=False).edit(PREFS[:2], verify=False, method="representation",
                                                              gate="always", **FAST)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path)
    editor = PersonalizationEditor(loaded, tokenizer, progress=False)
    editor.edit_users({"new": PREFS[2:]}, verify=False, method="representation", gate="always", **FAST)
    assert edit_layers(loaded)[0].num_clusters("new") == 1 == len(loaded.peft_config["new"].preferences)


def test_keyed_edit_fires_at_the_subject_token(tokenizer):
    pm = tiny_pm(layers=(1,))
    editor = PersonalizationEditor(pm, tokenizer, progress=False)
    report = editor.edit([PREFS[1]], verify=False, method="representation", gate="keys", **FAST)
    layer = edit_layers(pm)[0]
    bank = layer.bank("default")
    assert bank.keys.shape[0] >= 1 and torch.isfinite(bank.tau).all() and report.results[0].cluster_size >= 1
    text = chat_text(tokenizer, PREFS[1].question)
    position = subject_token_index(tokenizer, text, PREFS[1].question, PREFS[1].subject)
    _, delta = layer_io(pm, layer, torch.tensor([encode(tokenizer, text)]))
    assert torch.allclose(delta[0, position], bank.shift[0], atol=1e-5)


def test_cli_edit_with_method_representation(tmp_path):
    from peft_persedit.cli import main

    model_dir = tmp_path / "tiny"
    make_tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    prefs = tmp_path / "p.json"
    prefs.write_text(json.dumps([PREFS[1].to_dict()]))
    out = tmp_path / "alice"
    argv = ["edit", "--preferences", str(prefs), "--out", str(out), "--model", str(model_dir), "--layers", "1",
            "--method", "representation", "--always-on", "--no-verify"]
    assert main(argv) == 0
    entry = json.loads((out / "adapter_config.json").read_text())["preferences"][0]
    assert entry["kind"] == "representation" and entry["gate"] == "always" and entry["alpha"] >= 0


@pytest.mark.real_model
def test_real_model_representation_edit(tmp_path):
    from peft_persedit import load_default_model
    from peft_persedit.data_paths import dataset_path
    from peft_persedit.preferences import load_preferences

    model, tokenizer = load_default_model()  # a model of our own (the session's ``smol`` may be wrapped)
    pref = load_preferences(dataset_path("prefeval_pro100"))[0]
    pm = get_peft_model(model, PersonalizationEditConfig()).eval()
    editor = PersonalizationEditor(pm, tokenizer, progress=False)
    options = dict(fit_prompts=2, select_prompts=1, own_questions=1, max_new_tokens=12, alphas=(0.0, 4.0, 16.0))
    editor.edit([pref], verify=False, method="representation", gate="always", **options)
    entry = pm.peft_config["default"].preferences[0]
    assert entry["kind"] == "representation" and entry["alpha"] in options["alphas"]
    ids = torch.tensor([encode(tokenizer, chat_text(tokenizer, pref.question))] * 2)
    mixed = pm(ids, adapter_names=["default", "__base__"]).logits.detach()
    with pm.disable_adapter():
        assert torch.allclose(mixed[1], pm(ids[1:]).logits[0], atol=1e-4)
    pm.save_pretrained(tmp_path)
    fresh, _ = load_default_model()
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert torch.allclose(loaded(ids).logits, mixed[:1].expand(2, -1, -1), atol=1e-4)
