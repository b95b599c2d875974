"""``persedit`` never loses a user's data and rejects bad input before work starts (tiny saved model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import PeftModel
from test_cli import ITEMS, write

from peft_persedit.cli import main

LANG = "favorite programming language"
RUST = {"subject": LANG, "question": f"What is my {LANG}?", "target": "Rust"}
GO = {**RUST, "target": "Go"}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path → bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def edit(prefs: str, out: Path, model, *extra: str) -> int:
    return main(["edit", "--preferences", prefs, "--out", str(out), "--model", str(model), "--layers", "1",
                 "--no-verify", *extra])


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture
def adapter(tiny_dir, tmp_path):
    """An adapter holding ITEMS, plus a README.md and notes.txt the user put into its folder."""
    out = tmp_path / "alice"
    assert edit(write(tmp_path / "p.json", ITEMS), out, tiny_dir) == 0
    (out / "README.md").write_text("my notes about alice\n")
    (out / "notes.txt").write_text("do not delete\n")
    return out


def foreign_folder(path: Path) -> Path:
    path.mkdir()
    (path / "thesis.tex").write_text("years of work")
    return path


def lora_folder(path: Path) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (path / "adapter_model.safetensors").write_bytes(b"lora weights")
    return path


def a_file(path: Path) -> Path:
    path.write_text("a file of mine")
    return path


@pytest.mark.parametrize("make, message", [(foreign_folder, "not a PERSEDIT adapter"), (lora_folder, "PERSEDIT"),
                                           (a_file, "existing file")], ids=["folder", "lora-adapter", "file"])
def test_edit_refuses_an_out_that_is_not_ours_before_any_work(tmp_path, capsys, make, message):
    out = make(tmp_path / "mydocs")
    before, listing = snapshot(tmp_path), sorted(p.name for p in tmp_path.iterdir())
    # a model that does not exist: had the model been loaded first, the error would be about the model
    assert edit(write(tmp_path / "p.json", ITEMS), out, tmp_path / "no-model") == 2
    err = last_error(capsys)
    assert "mydocs" in err and message in err and "no-model" not in err
    before["p.json"] = (tmp_path / "p.json").read_bytes()
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == sorted(listing + ["p.json"])


def test_edit_into_an_empty_folder(tiny_dir, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert edit(write(tmp_path / "p.json", ITEMS), out, tiny_dir) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()


def test_same_preferences_again_change_nothing(adapter, tiny_dir, capsys):
    before = snapshot(adapter)
    assert edit(str(adapter.parent / "p.json"), adapter, tiny_dir) == 0
    assert "nothing to edit" in capsys.readouterr().out
    assert snapshot(adapter) == before


def test_extending_keeps_the_users_files_and_merges_the_report(adapter, tiny_dir, tmp_path, capsys):
    assert edit(write(tmp_path / "rust.json", [RUST]), adapter, tiny_dir) == 0
    assert (adapter / "README.md").read_text() == "my notes about alice\n"
    assert (adapter / "notes.txt").read_text() == "do not delete\n"
    report = json.loads((adapter / "edit_report.json").read_text())
    assert [r["target"] for r in report["results"]] == ["A turtle", "Rust"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_interrupted_save_leaves_the_old_adapter_intact(adapter, tiny_dir, tmp_path, capsys, monkeypatch):
    def broken_save(self, save_directory, **kwargs):
        Path(save_directory, "adapter_model.safetensors").write_bytes(b"half a tensor")
        raise OSError("No space left on device")

    before = snapshot(adapter)
    monkeypatch.setattr(PeftModel, "save_pretrained", broken_save)
    assert edit(write(tmp_path / "rust.json", [RUST]), adapter, tiny_dir) == 2
    assert "No space left" in last_error(capsys)
    monkeypatch.undo()
    assert snapshot(adapter) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice", "p.json", "rust.json"]
    assert main(["ask", str(adapter), "What's my pet?", "--model", str(tiny_dir), "--max-new-tokens", "2"]) == 0


def test_conflict_update_and_forget(adapter, tiny_dir, tmp_path, capsys):
    assert edit(write(tmp_path / "rust.json", [RUST]), adapter, tiny_dir) == 0
    before = snapshot(adapter)
    go = write(tmp_path / "go.json", [GO])
    assert edit(go, adapter, tiny_dir) == 2
    err = last_error(capsys)
    assert "already holds" in err and "'Rust'" in err and "persedit update" in err
    assert snapshot(adapter) == before
    assert main(["update", str(adapter), "--preferences", go, "--no-verify"]) == 0
    assert "replaced" in capsys.readouterr().out
    assert main(["show", str(adapter)]) == 0
    shown = capsys.readouterr().out
    assert "→ Go" in shown and "Rust" not in shown and "A turtle" in shown
    report = json.loads((adapter / "edit_report.json").read_text())
    assert [r["target"] for r in report["results"]] == ["A turtle", "Go"]
    assert main(["update", str(adapter), "--preferences", go]) == 0  # nothing new: nothing rewritten
    assert "nothing to update" in capsys.readouterr().out
    assert main(["forget", str(adapter), "nope"]) == 2
    assert "no preference with id or subject 'nope'" in last_error(capsys)
    assert main(["forget", str(adapter), LANG.upper(), "pet"]) == 0
    assert main(["show", str(adapter)]) == 0
    assert "(no preferences)" in capsys.readouterr().out
    assert json.loads((adapter / "edit_report.json").read_text())["results"] == []
    assert (adapter / "notes.txt").read_text() == "do not delete\n"


def test_update_with_one_preference_on_the_command_line(adapter, capsys):
    assert main(["update", str(adapter), "--subject", "pet", "--question", "What's my pet?", "--target", "A cat",
                 "--no-verify"]) == 0
    assert "replaced" in capsys.readouterr().out and main(["show", str(adapter)]) == 0
    shown = capsys.readouterr().out
    assert "→ A cat" in shown and "turtle" not in shown
    assert main(["update", str(adapter), "--subject", "pet"]) == 2
    assert "--question and --target" in last_error(capsys)


def test_editor_warns_and_update_replaces_by_subject(tokenizer):
    from peft import get_peft_model
    from tiny_models import make_tiny_model

    from peft_persedit import PersonalizationEditConfig
    from peft_persedit.editing import PersonalizationEditor
    from peft_persedit.preferences import Preference

    config = PersonalizationEditConfig(layers_to_transform=[1], synonyms=0, contexts=1, value_steps=3, mom2="none")
    editor = PersonalizationEditor(get_peft_model(make_tiny_model("llama"), config), tokenizer, progress=False)
    editor.edit([Preference(**RUST)], verify=False)
    with pytest.warns(UserWarning, match="already holds .*'Rust'.*update"):
        editor.edit([Preference(**GO)], verify=False)
    assert [p.target for p in editor.preferences] == ["Rust", "Go"]
    editor.update(Preference(**{**RUST, "target": "Zig"}), verify=False)
    assert [p.target for p in editor.preferences] == ["Zig"]


def test_version_and_unknown_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("persedit ")
    with pytest.raises(SystemExit) as exit_:
        main(["--bogus"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "unrecognized arguments: --bogus" in err and "required" not in err
    with pytest.raises(SystemExit):
        main([])
    assert "a command is required" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.json"], "not found: missing.json"),
    (["--data", "some/dir/items"], "not found: some/dir/items"),
    (["--data", "nonsense"], "unknown dataset 'nonsense'"),
    (["--data", "upqa_dev", "--fillers", "nofillers.json"], "not found: nofillers.json"),
])
def test_eval_rejects_bad_paths_before_work(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", *args, "--out", "res", "--model", "no-model"]) == 2
    assert message in last_error(capsys)
    assert not (tmp_path / "res").exists()


def test_eval_names_turns_and_an_out_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--data", "upqa_dev", "--out", str(tmp_path / "r"), "--turns", "a,b"])
    assert "argument --turns: turns must be comma-separated integers" in capsys.readouterr().err
    taken = a_file(tmp_path / "taken.txt")
    assert main(["eval", "--data", "upqa_dev", "--out", str(taken), "--model", "no-model"]) == 2
    assert "taken.txt" in last_error(capsys) and taken.read_text() == "a file of mine"
