"""Group + difference adapters (DPL-style): clustering and the split, the prompting baseline, build → save →
load → compose on a tiny model, the users file, the CLI, and clustering + composition on the embedded model."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import edit_layers
from tiny_models import make_tiny_model, tiny_tokenizer

from peft_persedit import PersonalizationEditConfig, group_users
from peft_persedit.cli import main
from peft_persedit.editing.chat import chat_text, encode
from peft_persedit.groups import build_group_adapters, dpl_context, load_group_adapters, load_users
from peft_persedit.preferences import Preference, PreferenceError

TINY = dict(layers_to_transform=[1], synonyms=0, contexts=1, value_steps=3, mom2="none")


def pref(subject: str, target: str) -> Preference:
    return Preference(subject, f"What's my {subject}?", target)


SHARED = {"a": [pref("hobby", "Dancing"), pref("pet", "A turtle"), pref("city", "Oslo")],
          "b": [pref("food", "Sushi"), pref("car", "A Volvo"), pref("job", "Nurse")]}


def make_users() -> dict[str, list[Preference]]:
    """Three users per latent group (its 3 shared preferences + 2 own), and one who holds only part of group a's."""
    own = iter(pref(f"item{i}", f"Thing {i}") for i in range(20))
    users = {f"{g}{k}": SHARED[g] + [next(own), next(own)] for g in "ab" for k in range(3)}
    users["odd"] = SHARED["a"][:1] + [next(own)]
    return users


def test_group_users_splits_shared_and_distinct_preferences():
    users = make_users()
    plan = group_users(users, 2)
    assert plan.embedding == "ids"
    assert sorted(map(sorted, plan.members.values())) == [["a0", "a1", "a2", "odd"], ["b0", "b1", "b2"]]
    group_a = plan.group_of("a1")
    assert plan.representatives[group_a] == ["a0", "a1", "a2"]  # the closest to the centroid; "odd" is not
    assert [p.id for p in plan.group_preferences[group_a]] == [p.id for p in SHARED["a"]]
    assert plan.user_preferences["a1"] == users["a1"][3:] and plan.adapter_names("a1") == f"{group_a}+a1"
    assert plan.user_group["odd"] is None and plan.user_preferences["odd"] == users["odd"]
    assert plan.adapter_names("odd") == "odd"  # lacks two of the group's preferences: used alone
    index = plan.to_index()
    assert index["users"]["b2"]["group"] == plan.group_of("b2") and set(index["groups"]) == set(plan.members)
    assert group_users(users, 2, share=1.0, representatives=2).group_preferences[group_a] == SHARED["a"]
    with pytest.raises(ValueError, match="cannot name an adapter"):
        group_users({"x+y": SHARED["a"]}, 1)


def test_model_embedding_groups_identical_users_together(tokenizer):
    users = {"p": SHARED["a"], "q": SHARED["a"], "r": SHARED["b"], "s": SHARED["b"]}
    plan = group_users(users, 2, model=make_tiny_model("llama"), tokenizer=tokenizer)
    assert plan.embedding == "model" and plan.group_of("p") == plan.group_of("q") != plan.group_of("r")
    assert plan.group_of("r") == plan.group_of("s")


def test_dpl_context_states_what_is_shared_and_what_differs():
    users = make_users()
    plan = group_users(users, 2)
    text = dpl_context("a1", users, plan)
    shared_part, different_part = text.split("What makes this user different")
    assert "My hobby is Dancing." in shared_part and "My item2 is Thing 2." in different_part
    assert "Thing 0" not in text  # another representative's own preference is not typical of the group
    odd = dpl_context("odd", users, plan)
    assert "never said:\n- My pet is A turtle." in odd


def test_build_save_load_and_compose(tokenizer, tmp_path):
    users = make_users()
    plan = group_users(users, 2)
    pm, report = build_group_adapters(make_tiny_model("llama"), tokenizer, plan, out=tmp_path,
                                      config=PersonalizationEditConfig(**TINY))
    assert len(report.results) == 6 + 2 * 6 + 2  # two group adapters of 3, six differences of 2, "odd" alone
    group_a = plan.group_of("a1")
    assert [e["id"] for e in pm.peft_config[group_a].preferences] == [p.id for p in SHARED["a"]]
    assert [e["id"] for e in pm.peft_config["a1"].preferences] == [p.id for p in users["a1"][3:]]
    assert (tmp_path / "groups" / group_a / "adapter_model.safetensors").is_file()
    assert (tmp_path / "users" / "odd" / "adapter_config.json").is_file()
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["users"]["a1"]["adapter_names"] == f"{group_a}+a1" and index["users"]["odd"]["group"] is None
    questions = ["What's my hobby?", "What's my item2?", "What's my hobby?", "Hi"]
    seqs = [encode(tokenizer, chat_text(tokenizer, q)) for q in questions]
    ids = torch.tensor([s + [2] * (max(map(len, seqs)) - len(s)) for s in seqs])
    routes = [plan.adapter_names(u) for u in ("a1", "a1", "odd")] + ["__base__"]
    mixed = pm(ids, adapter_names=routes).logits.detach()
    pm.base_model.set_adapter([group_a, "a1"])  # "g+u" is the composition of both banks
    assert torch.allclose(pm(ids[:2]).logits, mixed[:2], atol=1e-5)
    loaded, loaded_index = load_group_adapters(make_tiny_model("llama"), tmp_path, users=["a1", "odd"])
    assert loaded_index == index and sorted(loaded.peft_config) == sorted([group_a, "a1", "odd"])
    assert torch.allclose(loaded(ids, adapter_names=routes).logits, mixed, atol=1e-5)
    assert sum(layer.num_clusters(group_a) for layer in edit_layers(loaded)) == 3
    with pytest.raises(KeyError, match="unknown user"):
        load_group_adapters(make_tiny_model("llama"), tmp_path, users=["zed"])


def test_users_file_errors_name_the_user(tmp_path):
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"alice": [{"subject": "pet", "question": "What's my pet?", "target": ""}]}))
    with pytest.raises(PreferenceError, match="user 'alice'.*'target' is empty"):
        load_users(path)
    path.write_text("[1, 2]")
    with pytest.raises(PreferenceError, match="expected a non-empty JSON object"):
        load_users(path)
    path.write_text(json.dumps({"a+b": [SHARED["a"][0].to_dict()]}))
    with pytest.raises(ValueError, match="cannot name an adapter"):
        load_users(path)


def test_cli_group_and_group_ask(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    make_tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    users = tmp_path / "users.json"
    users.write_text(json.dumps({u: [p.to_dict() for p in prefs] for u, prefs in make_users().items()}))
    out = tmp_path / "out"
    argv = ["group", "--users", str(users), "--groups", "2", "--out", str(out), "--model", str(model_dir),
            "--layers", "1", "--embedding", "ids", "--no-verify"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 shared preferences" in printed and "used alone" in printed and (out / "index.json").is_file()
    assert main(["group-ask", str(out), "a1", "What's my hobby?", "--model", str(model_dir),
                 "--max-new-tokens", "3"]) == 0
    assert main(["group-ask", str(out), "zed", "Hi", "--model", str(model_dir)]) == 2
    assert "unknown user" in capsys.readouterr().err
    assert main(["group", "--users", str(tmp_path / "nope.json"), "--groups", "2", "--out", str(out)]) == 2


@pytest.mark.real_model
def test_real_model_groups(tmp_path):
    from peft_persedit import load_default_model
    from peft_persedit.data_paths import dataset_path
    from peft_persedit.preferences import load_preferences

    model, tokenizer = load_default_model()  # a model of our own (the session's ``smol`` may be wrapped)
    items = load_preferences(dataset_path("upqa_balanced100"))[::12]
    users = {"p": items[0:2] + items[4:5], "q": items[0:2] + items[5:6],
             "r": items[2:4] + items[6:7], "s": items[2:4] + items[7:8]}
    plan = group_users(users, 2, model=model, tokenizer=tokenizer)
    assert plan.group_of("p") == plan.group_of("q") != plan.group_of("r") == plan.group_of("s")
    two = {u: users[u] for u in ("p", "q")}
    plan = group_users(two, 1, embedding="ids")
    config = PersonalizationEditConfig(synonyms=0, contexts=0, value_steps=2, mom2="none")
    pm, _ = build_group_adapters(model, tokenizer, plan, out=tmp_path, config=config)
    routes = [plan.adapter_names(u) for u in two] + ["__base__"]
    ids = torch.tensor([encode(tokenizer, chat_text(tokenizer, items[0].question))] * 3)
    mixed = pm(ids, adapter_names=routes).logits.detach()
    fresh, _ = load_default_model()
    loaded, _ = load_group_adapters(fresh, tmp_path)
    assert torch.allclose(loaded(ids, adapter_names=routes).logits, mixed, atol=1e-4)
