"""``persedit`` CLI: edit → show → ask on a tiny saved model, and one-line errors with exit code ≠ 0."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import peft_persedit.cli
from peft_persedit.cli import main

ITEMS = [
    {"input_attribute": "I keep a turtle.", "attribute_type": "pet", "question": "What's my pet?",
     "question_paraphrased": "Which animal lives with me?", "implicit_question": "What food should I buy?",
     "product_recommendation_question": "Any toys for my pet?", "target": "A turtle"},
]


def write(path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_edit_show_ask_round_trip(tiny_dir, tmp_path, capsys):
    prefs = write(tmp_path / "p.json", ITEMS)
    out = tmp_path / "alice"
    assert main(["edit", "--preferences", prefs, "--out", str(out), "--model", str(tiny_dir), "--layers", "1"]) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "edit_report.json").is_file()
    assert main(["show", str(out)]) == 0
    assert "pet: What's my pet? → A turtle" in capsys.readouterr().out
    assert main(["ask", str(out), "What's my pet?", "--model", str(tiny_dir), "--max-new-tokens", "4"]) == 0
    before = (out / "adapter_config.json").read_text()
    assert main(["edit", "--preferences", write(tmp_path / "bad.json", "[{"), "--out", str(out)]) == 2
    assert (out / "adapter_config.json").read_text() == before  # a failed edit leaves the saved adapter alone


@pytest.mark.parametrize(
    "content, message",
    [
        ("[{", "malformed JSON"),
        ("[]", "empty"),
        ([{"attribute_type": "pet", "question": "What's my pet?"}], "item 0"),
        ([{**ITEMS[0], "target": "  "}], "'target' is empty"),
        ([{**ITEMS[0], "question": "Where do I live?"}], "does not occur"),
    ],
    ids=["malformed", "empty", "missing-field", "empty-target", "subject-absent"],
)
def test_bad_input_gives_one_line_error(tiny_dir, tmp_path, capsys, content, message):
    path = write(tmp_path / "p.json", content)
    code = main(["edit", "--preferences", path, "--out", str(tmp_path / "o"), "--model", str(tiny_dir), "--layers",
                 "1", "--no-verify"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars may precede the one-line cause
    assert code != 0 and err.startswith("persedit: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_model_not_found(tmp_path, capsys):
    path = write(tmp_path / "p.json", ITEMS)
    assert main(["edit", "--preferences", path, "--out", str(tmp_path / "o"), "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_explains(capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    assert "--preferences" in capsys.readouterr().out


def test_cli_package_imports_point_one_way():
    """The command modules import only ``cli.common`` from the package (no cycle); common imports none."""
    package = Path(peft_persedit.cli.__file__).parent
    allowed = {"adapters": {"common"}, "groups": {"common"}, "eval": {"common"}, "common": set()}
    for name, ok in allowed.items():
        tree = ast.parse((package / f"{name}.py").read_text())
        siblings = {node.module or "." for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.level == 1}
        assert siblings <= ok, f"cli/{name}.py imports {siblings - ok}"


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "peft_persedit.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(command in result.stdout for command in ("edit", "forget", "group-ask", "eval"))
