"""The gate-threshold sweep: :func:`shifted_thresholds` on a tiny model (shifts, restores bit-identically, also on
an error), ``gate_sweep`` / ``--gate-sweep`` parsing, the method hook, and ``persedit eval``'s frontier rows,
table and plot on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import IDS, add_keyed_cluster, edit_layers, layer_io, threshold_between
from peft import get_peft_model
from tiny_models import make_tiny_model
from torch.nn.functional import cosine_similarity

from peft_persedit import PersonalizationEditConfig
from peft_persedit.cli import main, parse
from peft_persedit.editing import shifted_thresholds
from peft_persedit.evaluation import EvalConfig
from peft_persedit.evaluation.config import DEFAULT_GATE_SWEEP
from peft_persedit.evaluation.methods import ROME, Method, PersEdit
from peft_persedit.evaluation.metrics import FRONTIER_METRICS
from peft_persedit.evaluation.plots import plot_frontier
from peft_persedit.evaluation.report import tables

ITEMS = [
    {"input_attribute": text, "attribute_type": subject, "question": f"What's my {subject}?",
     "question_paraphrased": paraphrase, "implicit_question": implicit,
     "product_recommendation_question": product, "target": target}
    for subject, target, text, paraphrase, implicit, product in [
        ("pet", "A turtle", "I keep a turtle.", "Which animal lives with me?", "What food should I buy?",
         "Any toys for my pet?"),
        ("city", "Oslo", "I live in Oslo.", "Where do I live?", "Where should I eat tonight?",
         "Any souvenirs from my city?"),
    ]
]


def taus(pm) -> list[torch.Tensor]:
    return [t for layer in edit_layers(pm) for t in layer.persedit_tau.values()]


def test_shifted_thresholds_fire_more_and_restore_bit_identically():
    pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(init_clusters=1))  # + a τ = −∞ one
    layer = edit_layers(pm)[0]
    x, _ = layer_io(pm, layer, IDS)
    key = x[0, 3]
    tau = threshold_between(cosine_similarity(x.float(), key.float(), dim=-1))
    add_keyed_cluster(layer, "default", key, tau)
    _, delta = layer_io(pm, layer, IDS)
    fired = (delta.abs().amax(-1) > 0).sum()
    before, logits = taus(pm), pm(IDS).logits
    with shifted_thresholds(pm, -2.5) as shifted:
        assert shifted == 1  # the finite τ only
        now = layer.persedit_tau["default"]
        assert torch.isneginf(now[0]) and torch.allclose(now[1], before[0][1] - 2.5)
        _, delta = layer_io(pm, layer, IDS)
        assert (delta.abs().amax(-1) > 0).sum() > fired and (delta.abs().amax(-1) > 0).all()  # cos ≥ −1 > τ − 2.5
        assert not torch.equal(pm(IDS).logits, logits)
    assert all(a is b for a, b in zip(taus(pm), before)) and torch.equal(pm(IDS).logits, logits)
    with pytest.raises(RuntimeError, match="boom"), shifted_thresholds(pm.base_model.model, 3.0):
        assert not torch.equal(pm(IDS).logits, logits)  # τ > 1: the keyed cluster never fires
        raise RuntimeError("boom")
    assert all(a is b for a, b in zip(taus(pm), before)) and torch.equal(pm(IDS).logits, logits)


def test_gate_sweep_config_cli_flag_and_method_hook(tmp_path):
    assert EvalConfig().gate_sweep == list(DEFAULT_GATE_SWEEP) == [-0.3, -0.2, -0.1, -0.05, 0.05]
    assert EvalConfig(gate_sweep="0.05, -0.1,-0.1").gate_sweep == [-0.1, 0.05]
    assert EvalConfig(gate_sweep="").gate_sweep == [] and EvalConfig(gate_sweep=[0.1, -1]).gate_sweep == [-1.0, 0.1]
    for bad, message in (("a,b", "comma-separated numbers"), ("0.1,nan", "finite")):
        with pytest.raises(ValueError, match=message):
            EvalConfig(gate_sweep=bad)
    base = ["eval", "--data", "upqa_dev", "--out", str(tmp_path / "r")]
    assert parse(base).gate_sweep == list(DEFAULT_GATE_SWEEP)
    assert parse([*base, "--gate-sweep", "-0.3,-0.1"]).gate_sweep == [-0.3, -0.1]  # a negative list is a value
    assert parse([*base, "--gate-sweep", ""]).gate_sweep == []
    with pytest.raises(SystemExit):
        parse([*base, "--gate-sweep", "x"])
    assert PersEdit.gate_sweep and not Method.gate_sweep and not ROME.gate_sweep
    with pytest.raises(NotImplementedError):
        Method.shifted_gates(object.__new__(Method), 0.1)


def test_eval_gate_sweep_gives_frontier_rows_table_and_plot(tiny_dir, tmp_path):
    data, out = tmp_path / "d.json", tmp_path / "ev"
    data.write_text(json.dumps(ITEMS))
    assert main(["eval", "--data", str(data), "--model", str(tiny_dir), "--out", str(out), "--methods",
                 "base,persedit", "--protocols", "single,grouped", "--group-size", "2", "--turns", "0,1",
                 "--max-new-tokens", "3", "--locality-prompts", "2", "--locality-users", "1",
                 "--gate-sweep", "-2,2"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["frontier"]
    assert [(r["protocol"], r["method"], r["gate_offset"]) for r in rows] == [
        ("single", "persedit", o) for o in (-2.0, 0.0, 2.0)]  # single protocol, gated method only
    main_run = {r["metric"]: r["exact"] for r in results["summary"]
                if (r["protocol"], r["method"], r["turns"]) == ("single", "persedit", 0)}
    assert {m: rows[1][m] for m in FRONTIER_METRICS} == {m: main_run[m] for m in FRONTIER_METRICS}
    assert rows[2]["locality_neutral"] == rows[2]["locality_other"] == 1.0  # τ + 2 > 1: no gate fires
    sweep = results["frontier_records"]
    assert {r["gate_offset"] for r in sweep} == {-2.0, 2.0} and {r["method"] for r in sweep} == {"persedit"}
    assert {r["metric"] for r in sweep} == set(FRONTIER_METRICS)  # no multi-turn in the sweep
    efficacy = [r for r in results["summary"] if r["method"] == "persedit" and r["metric"] == "efficacy"]
    assert {r["n"] for r in efficacy} == {2}  # sweep records stay out of the summary
    assert "gate_sweep" in results["timings"]["persedit/single"] and "gate_sweep" in results["cpu_seconds"][
        "persedit/single"] and "gate_sweep" not in results["timings"]["persedit/grouped"]
    markdown = (out / "results.md").read_text()
    assert "### Gate-threshold frontier" in markdown and "| persedit | -2 |" in markdown
    assert (out / "frontier.png").stat().st_size > 1000


def test_frontier_plot_and_table_from_a_results_dict(tmp_path):
    point = {"efficacy": 0.5, "generalization": 0.4, "implicit": 0.2, "product": None,
             "locality_neutral": 0.9, "locality_other": 0.8}
    frontier = [{"protocol": "single", "method": "persedit", "gate_offset": o, **point} for o in (-0.1, 0.0, 0.05)]
    summary = [{"protocol": "single", "method": m, "metric": k, "turns": 0, "n": 1, "exact": v, "semantic": None}
               for m in ("base", "lora", "persedit") for k, v in point.items() if v is not None]
    results = {"frontier": frontier, "summary": summary, "users": {"single": 1}, "cost": []}
    assert plot_frontier(results, tmp_path / "frontier.png").stat().st_size > 1000
    assert plot_frontier({**results, "frontier": []}, tmp_path / "none.png") is None
    table = tables(results)
    assert "| persedit | -0.1 | 0.50 | 0.40 | 0.20 | – | 0.90 | 0.80 |" in table and "| persedit | +0 |" in table
    assert "Gate-threshold frontier" not in tables({**results, "frontier": []})
