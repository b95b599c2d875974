"""The evaluation harness: scoring, users, fillers, summaries and reports; the whole ``persedit eval`` on a tiny
model (every method, both protocols); bad input as one-line errors; a ``--limit 5`` smoke run on the embedded
model (real_model)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import make_tiny_model, tiny_tokenizer

from peft_persedit.cli import main
from peft_persedit.evaluation import EvalConfig, summarize
from peft_persedit.evaluation.distractors import first_sentence, history, load_fillers
from peft_persedit.evaluation.generation import generate_chats, greedy_unchanged, make_chat
from peft_persedit.evaluation.metrics import Record, distinct_ngrams
from peft_persedit.evaluation.report import tables
from peft_persedit.evaluation.scoring import overlap, stem, word_match
from peft_persedit.evaluation.users import grouped_users, round_robin, single_users, spread
from peft_persedit.preferences import Preference


def upqa_item(subject: str, target: str, text: str, paraphrase: str, implicit: str, product: str) -> dict:
    return {"input_attribute": text, "attribute_type": subject, "question": f"What's my {subject}?",
            "question_paraphrased": paraphrase, "implicit_question": implicit,
            "product_recommendation_question": product, "target": target}


ITEMS = [
    upqa_item("pet", "A turtle", "I keep a turtle.", "Which animal lives with me?", "What food should I buy?",
              "Any toys for my pet?"),
    upqa_item("city", "Oslo", "I live in Oslo.", "Where do I live?", "Where should I eat tonight?",
              "Any souvenirs from my city?"),
    upqa_item("hobby", "Painting", "I paint.", "What do I do for fun?", "What should I do on Sunday?",
              "Any gear for my hobby?"),
    upqa_item("pet", "A dog", "I own a dog.", "Which animal lives with me?", "What should I walk?",
              "Any toys for my pet?"),
]
FILLERS = [{"conversation": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]


def write(path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


# ------------------------------------------------------------------------------------------------ pieces
def test_overlap_scoring_stems_and_ignores_stopwords():
    assert stem("dancing") == stem("dance") == "danc" and stem("clubs") == "club" and stem("running") == "run"
    assert overlap("I love to dance in a club", "Dancing at clubs") == 1.0
    assert overlap("Clubs are fun", "Dancing at clubs") == 0.5 and word_match("Clubs are fun", "Dancing at clubs")
    assert not word_match("I like cats", "Dancing at clubs")
    assert overlap("none here", "At") == 0.0 and overlap("look at it", "At") == 1.0  # no content word: substring


def test_round_robin_and_grouping_keep_types_and_questions_distinct():
    items = [Preference("hobby", "What's my hobby?", f"h{i}") for i in range(3)] + [
        Preference("pet", "What's my pet?", f"p{i}") for i in range(2)] + [Preference("job", "What's my job?", "x")]
    order = round_robin(items)
    assert [p.subject for p in order[:4]] == ["hobby", "pet", "job", "hobby"] and len(round_robin(items, 2)) == 2
    users = grouped_users(order, size=3)
    assert list(users) == ["g00", "g01"] and len(users["g00"]) == 3  # the last group (one preference) is dropped
    for group in users.values():
        assert len({p.subject for p in group}) == len(group) == len({p.question for p in group})
    assert list(single_users(order[:2])) == ["u000", "u001"]
    assert spread(list("abcdefghij"), 3) == ["a", "e", "j"] and spread(list("ab"), 0) == ["a", "b"]


def test_fillers_and_distractor_history(tmp_path):
    pairs = load_fillers(write(tmp_path / "f.json", FILLERS))
    assert pairs == [("Hi", "Hello!"), ("2+2?", "4")]
    assert history(pairs, 3) == (("user", "Hi"), ("assistant", "Hello!"), ("user", "2+2?"), ("assistant", "4"),
                                 ("user", "Hi"), ("assistant", "Hello!"))
    assert first_sentence("Rome is the capital. It is old.") == "Rome is the capital."
    bad = [{"conversation": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]}]
    with pytest.raises(ValueError, match=r"item 0: conversation\[1\] needs 'role'"):
        load_fillers(write(tmp_path / "b.json", bad))
    with pytest.raises(ValueError, match="item 0: field 'conversation'"):
        load_fillers(write(tmp_path / "c.json", [{"turns": []}]))


def test_config_rejects_unknown_methods_and_bad_numbers():
    assert EvalConfig(methods="persedit, base", turns="2,0,2").methods == ["base", "persedit"]
    assert EvalConfig(turns="2,0,2").turns == [0, 2]
    with pytest.raises(ValueError, match="unknown method"):
        EvalConfig(methods="base,memit")
    with pytest.raises(ValueError, match="limit must be"):
        EvalConfig(limit=0)


def test_summary_averages_locality_per_user_and_fills_multiturn_zero():
    def rec(user: str, metric: str, exact: bool, turns: int = 0) -> Record:
        semantic = None if metric.startswith("locality") else exact
        return Record("single", "m", user, "", metric, turns, "q", "t", "a", exact, None, semantic)

    records = [rec("u0", "locality_neutral", True), rec("u1", "locality_neutral", True),
               rec("u1", "locality_neutral", False), rec("u1", "locality_neutral", False),
               rec("u0", "efficacy", True), rec("u1", "efficacy", False), rec("u0", "multiturn", False, 2)]
    rows = {(r["metric"], r["turns"]): r for r in summarize(records)}
    assert math.isclose(rows[("locality_neutral", 0)]["exact"], (1 + 1 / 3) / 2)
    assert rows[("multiturn", 0)]["exact"] == rows[("efficacy", 0)]["exact"] == 0.5
    results = {"summary": list(rows.values()), "users": {"single": 2},
               "cost": [{"protocol": "single", "method": "persedit", "seconds_per_user": 1.0, "peak_rss_mb": 9,
                         "adapter_bytes_per_preference": 10}]}
    for r in results["summary"]:
        r["method"] = "persedit"
    table = tables(results)
    assert "| persedit | 0.50 / 0.50 |" in table and "multiturn@2" in table
    assert rows[("efficacy", 0)]["fluency"] == 1.0 and rows[("locality_neutral", 0)]["fluency"] is None
    assert "| fluency |" in table and table.splitlines()[-1].endswith("| 1.00 | 1.00 | 9 | 10 |")


def test_fluency_is_distinct_trigrams_and_falls_when_answers_loop():
    assert distinct_ngrams("a b c a b c") == 3 / 4 and distinct_ngrams("Ice cream.") == distinct_ngrams("") == 1.0
    fluent = distinct_ngrams("Turtle owner. Turtles need a warm tank, clean water and leafy greens every day.")
    looping = distinct_ngrams("Turtle owner. I'm A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A")
    assert looping < 0.5 < fluent == 1.0


def test_unchanged_check_matches_generation():
    model, tokenizer = make_tiny_model("llama"), tiny_tokenizer()
    chats = [make_chat("What's my pet?"), make_chat("Hi there", system="Be brief.")]
    generated = generate_chats(model, tokenizer, chats, max_new_tokens=6)
    assert greedy_unchanged(model, tokenizer, chats, [g.ids for g in generated]) == [True, True]
    wrong = [[(g.ids[0] + 1) % 200] + g.ids[1:] for g in generated]
    assert greedy_unchanged(model, tokenizer, chats, wrong) == [False, False]
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
    changed = greedy_unchanged(model, tokenizer, chats, [g.ids for g in generated])
    assert changed == [a.ids == b.ids for a, b in zip(generated, generate_chats(model, tokenizer, chats,
                                                                                 max_new_tokens=6))]


# ---------------------------------------------------------------------------------------- the command
def test_eval_every_method_and_protocol_on_a_tiny_model(tiny_dir, tmp_path, capsys):
    data, fillers, out = write(tmp_path / "d.json", ITEMS), write(tmp_path / "f.json", FILLERS), tmp_path / "ev"
    code = main(["eval", "--data", data, "--model", str(tiny_dir), "--out", str(out), "--turns", "0,1,3",
                 "--fillers", fillers, "--group-size", "2", "--max-new-tokens", "4", "--locality-prompts", "3",
                 "--locality-users", "2", "--lora-steps", "2", "--judge", str(tiny_dir)])
    assert code == 0 and "### Protocol `grouped`" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["users"] == {"single": 4, "grouped": 2} and results["items"] == 4
    assert results["semantic_scorer"] == f"judge:{tiny_dir}" and "judge" in results["timings"]
    judged = [r for r in results["records"] if not r["metric"].startswith("locality")]
    assert judged and all(isinstance(r["semantic"], bool) for r in judged)
    assert {(c["protocol"], c["method"]) for c in results["cost"]} == {
        (p, m) for p in ("single", "grouped") for m in ("base", "ice", "lora", "rome", "persedit")}
    metrics = {(r["protocol"], r["metric"], r["turns"]) for r in results["summary"]}
    assert {("single", "multiturn", n) for n in (0, 1, 3)} <= metrics and ("grouped", "multiturn", 1) not in metrics
    assert {("single", m, 0) for m in ("efficacy", "generalization", "implicit", "product", "locality_neutral")
            } <= metrics
    base_locality = [r for r in results["summary"] if r["method"] == "base" and r["metric"].startswith("locality")]
    assert base_locality and all(r["exact"] == 1.0 for r in base_locality)
    lora = next(c for c in results["cost"] if c["method"] == "lora")
    assert lora["steps_per_user"] == 2 and lora["adapter_bytes"] > 0 and lora["peak_rss_mb"] > 0
    record = results["records"][0]
    assert {"answer", "exact", "overlap", "semantic", "seconds", "question", "target"} <= set(record)
    assert (out / "results.md").read_text().startswith("# UPQA evaluation")
    assert (out / "accuracy.png").stat().st_size > 1000 and (out / "multiturn.png").stat().st_size > 1000


def test_eval_representation_and_dpl_methods_on_a_tiny_model(tiny_dir, tmp_path):
    out = tmp_path / "ev"
    code = main(["eval", "--data", write(tmp_path / "d.json", ITEMS), "--model", str(tiny_dir), "--out", str(out),
                 "--methods", "dpl,representation", "--protocols", "grouped", "--turns", "0", "--group-size", "2",
                 "--max-new-tokens", "3", "--locality-prompts", "2", "--locality-users", "1", "--no-plots"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [c["method"] for c in results["cost"]] == ["representation", "dpl"]  # table order
    dpl = next(c for c in results["cost"] if c["method"] == "dpl")
    assert dpl["groups"] == 1 and dpl["adapter_bytes"] > 0
    representation = next(c for c in results["cost"] if c["method"] == "representation")
    assert representation["adapter_bytes"] > 0 and "generate" in representation["stage_seconds"]
    efficacy = {r["method"] for r in results["summary"] if r["metric"] == "efficacy"}
    assert efficacy == {"representation", "dpl"}


def test_dpl_system_prompt_says_what_the_user_shares_and_what_differs(tiny_dir):
    from peft_persedit.evaluation.methods import DPL

    method = DPL(EvalConfig(model=str(tiny_dir), progress=False))
    shared = [Preference("pet", "What's my pet?", "A turtle"), Preference("city", "Where?", "Oslo", id="c")]
    users = {f"u{i}": shared + [Preference("hobby", "What's my hobby?", f"H{i}")] for i in range(3)}
    method.personalize(users)
    system = method.route("u0").system
    assert system.startswith("You are a helpful AI assistant. ") and "My pet is A turtle." in system
    assert system.index("My pet is A turtle.") < system.index("different") < system.index("My hobby is H0.")
    assert method.route(None).system == "You are a helpful AI assistant."


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "file is empty"),
        ("[]", "empty"),
        ([{k: v for k, v in ITEMS[0].items() if k != "target"}], "item 0: missing field 'target'"),
        ([ITEMS[0], {**ITEMS[1], "question": 7}], "item 1: field 'question' must be a string, got int"),
        ({"not": "a preference"}, "item 0"),
    ],
    ids=["empty-file", "empty-list", "missing-field", "wrong-type", "not-preferences"],
)
def test_eval_bad_data_is_one_line(tmp_path, capsys, content, message):
    code = main(["eval", "--data", write(tmp_path / "d.json", content), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("persedit: error:") and message in err[0]
    assert not (tmp_path / "o").exists()


def test_eval_bad_options_are_one_line(tmp_path, capsys):
    data = write(tmp_path / "d.json", ITEMS)
    assert main(["eval", "--data", data, "--out", str(tmp_path / "o"), "--methods", "base,memit"]) == 2
    assert "unknown method(s) ['memit']" in capsys.readouterr().err
    fillers = write(tmp_path / "f.json", [{"conversation": "hi"}])
    assert main(["eval", "--data", data, "--out", str(tmp_path / "o"), "--fillers", fillers]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "f.json: item 0: field 'conversation'" in err[0]


@pytest.mark.real_model
def test_eval_smoke_on_the_embedded_model(tmp_path, capsys):
    """``persedit eval --limit 5`` on UPQA balanced100: base, ICE, LoRA (3 steps), persedit; turns 0, 2."""
    from peft_persedit.default_model import DefaultModelMissingError, gguf_path

    try:
        gguf_path()
    except DefaultModelMissingError as err:
        pytest.skip(str(err))
    out = tmp_path / "smoke"
    code = main(["eval", "--data", "upqa_balanced100", "--limit", "5", "--methods", "base,ice,lora,persedit",
                 "--turns", "0,2", "--protocols", "single", "--lora-steps", "3", "--locality-users", "1",
                 "--locality-prompts", "10", "--max-new-tokens", "16", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    score = {(r["method"], r["metric"], r["turns"]): r["exact"] for r in results["summary"]}
    efficacy = [r for r in results["records"] if r["metric"] == "efficacy"]
    assert len({r["item"] for r in efficacy}) == len({r["question"] for r in efficacy}) == 5  # 5 attribute types
    assert score[("persedit", "efficacy", 0)] >= 0.6 > score[("base", "efficacy", 0)]
    assert score[("persedit", "locality_neutral", 0)] >= 0.8 and score[("base", "locality_neutral", 0)] == 1.0
    assert ("persedit", "multiturn", 2) in score and ("lora", "multiturn", 2) in score
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", "accuracy.png", "multiturn.png"}


def test_eval_in_two_worker_processes_matches_one(tiny_dir, tmp_path):
    """``--workers 2``: the same jobs, records (in table order) and costs as one process; workers' jobs run
    elsewhere. Answers may differ where 1 vs 2 torch threads break a near-tie of the random model's logits."""
    data, fillers = write(tmp_path / "d.json", ITEMS), write(tmp_path / "f.json", FILLERS)
    results = {}
    for workers in (1, 2):
        out = tmp_path / f"ev{workers}"
        assert main(["eval", "--data", data, "--model", str(tiny_dir), "--out", str(out), "--turns", "0,1",
                     "--fillers", fillers, "--methods", "base,ice,lora,persedit", "--group-size", "2",
                     "--max-new-tokens", "4", "--locality-prompts", "3", "--locality-users", "2",
                     "--lora-steps", "2", "--workers", str(workers), "--no-plots"]) == 0
        results[workers] = json.loads((out / "results.json").read_text())
    one, two = results[1], results[2]
    assert two["environment"]["workers"] == 2 and two["environment"]["threads_per_worker"] >= 1
    assert list(two["timings"]) == list(one["timings"]) and len(one["timings"]) == 8

    def rows(result, keep=("protocol", "method", "user", "item", "metric", "turns", "question", "target")):
        return [tuple(r[k] for k in keep) for r in result["records"]]

    assert rows(two) == rows(one)
    base = [r["answer"] for r in two["records"] if r["method"] == "base"]
    assert base == [r["answer"] for r in one["records"] if r["method"] == "base"]  # run in this process both times
    assert [(c["protocol"], c["method"], c["users"]) for c in two["cost"]] == [
        (c["protocol"], c["method"], c["users"]) for c in one["cost"]]


def test_rome_baseline_fits_values_on_the_question_alone():
    """The paper's ROME: ungated, C = I, δ fit on the question only — persedit's request templates and chat
    histories (its defaults) must not leak into the baseline."""
    from peft_persedit import PersonalizationEditConfig
    from peft_persedit.evaluation.methods.rome import ROME_CONFIG

    config = PersonalizationEditConfig(**ROME_CONFIG)
    assert (config.gate, config.mom2, config.request_templates, config.value_histories, config.key_histories) == (
        "none", "none", 0, [], [])
