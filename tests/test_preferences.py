"""Preferences: the four shipped data files, cluster9 semantics, round trips, one-line errors; prompt sets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from peft_persedit.data_paths import DATASETS, dataset_path
from peft_persedit.preferences import Preference, PreferenceError, load_preferences, save_preferences
from peft_persedit.prompts import PROMPT_SETS, load_prompt_set

UPQA = {"input_attribute": "I like to dance at the club.", "attribute_type": "hobby", "question": "What's my hobby?",
        "question_paraphrased": "What do I enjoy doing?", "implicit_question": "Fun plans for Friday?",
        "product_recommendation_question": "Any gear I should buy for my hobby?", "target": "Dancing at clubs"}
PREFEVAL = {"topic": "travel", "preference": "I hate long flights.", "question": "Which destinations would suit me?",
            "explanation": "Short-haul only.", "subject": "destinations", "target": "nearby"}


def cluster9(n: int = 3) -> dict:
    item = {**UPQA, "input_attribute": "I go dancing every weekend."}
    item["attribute_type"] = [f"syn{i}" for i in range(n - 1)] + ["hobby"]
    item["question"] = [f"What's your syn{i}?" for i in range(n - 1)] + ["What's my hobby?"]
    item["target"] = [f"T{i}" for i in range(n - 1)] + ["Dancing at clubs"]
    return item


def write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content)
    return path


# ------------------------------------------------------------------------------------------ real files


@pytest.mark.parametrize("name, count", [("upqa_dev", 900), ("upqa_balanced100", 100),
                                         ("upqa_balanced100_cluster9", 100), ("prefeval_pro100", 100)])
def test_real_files_load(name: str, count: int) -> None:
    path = dataset_path(name)
    assert path.is_file() and path.parts[-3] == "data"  # the repo's copy (or ../shared/data)
    prefs = load_preferences(path)
    assert len(prefs) == count and len({p.id for p in prefs}) == count
    assert all(p.subject and p.question and p.target and p.text for p in prefs)


def test_real_cluster9_original_is_last() -> None:
    flat = load_preferences(dataset_path("upqa_balanced100"))
    clustered = load_preferences(dataset_path("upqa_balanced100_cluster9"))
    raw = json.loads(dataset_path("upqa_balanced100_cluster9").read_text())
    for f, c, r in zip(flat, clustered, raw):
        assert (c.subject, c.question, c.target, c.text) == (f.subject, f.question, f.target, f.text)
        assert c.id == f.id
        assert list(c.synonyms) == r["attribute_type"][:8] and list(c.questions) == r["question"][:8]
        assert list(c.targets) == r["target"][:8]
        assert c.cluster_questions()[0] == c.question and len(c.cluster_questions()) == len(set(r["question"]))
        assert len(c.cluster_targets()) == len(c.cluster_subjects()) == len(c.cluster_questions())
    assert flat[0].paraphrased_question and flat[0].implicit_question and flat[0].product_question


def test_real_prefeval_fields() -> None:
    raw = json.loads(dataset_path("prefeval_pro100").read_text())[0]
    pref = load_preferences(dataset_path("prefeval_pro100"))[0]
    assert (pref.subject, pref.question, pref.target, pref.text) == (
        raw["subject"], raw["question"], raw["target"], raw["preference"])


def test_dataset_path_errors(tmp_path: Path) -> None:
    assert set(DATASETS) == {"upqa_dev", "upqa_balanced100", "upqa_balanced100_cluster9", "prefeval_pro100"}
    assert dataset_path("prefeval_pro_balanced100") == dataset_path("prefeval_pro100")
    own = write(tmp_path, "x.json", "[]")
    assert dataset_path(own) == own
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        dataset_path("nope")


# ------------------------------------------------------------------------------------------ the dataclass


def test_preference_defaults_and_coercion() -> None:
    p = Preference("  hobby ", "What's my hobby?", "Dancing", synonyms=["pastime"], questions=["What's my pastime?"])
    assert p.subject == "hobby" and p.synonyms == ("pastime",) and isinstance(p.questions, tuple)
    assert isinstance(p.id, str) and p.id and p.id == Preference("hobby", "What's my hobby?", "Dancing").id
    assert p.id != Preference("hobby", "What's my hobby?", "Chess").id
    assert Preference("a", "a?", "b", id="  ").id  # blank id → derived
    assert Preference("a", "a?", "b", id="mine").id == "mine"


def test_cluster_questions_and_targets() -> None:
    p = Preference("hobby", "Q0", "T", synonyms=("a", "b", "c"), questions=("Q1", "Q0", "Q2"),
                   targets=("T1", "Tx", "T2"))
    assert p.cluster_questions() == ["Q0", "Q1", "Q2"]
    assert p.cluster_targets() == ["T", "T1", "T2"]
    assert p.cluster_subjects() == ["hobby", "a", "c"]
    bare = Preference("hobby", "Q0", "T", questions=("Q1",))
    assert bare.cluster_targets() == ["T", "T"] and bare.cluster_subjects() == ["hobby", "hobby"]
    assert Preference("s", "Q", "T").cluster_questions() == ["Q"]


@pytest.mark.parametrize("kwargs, pattern", [
    ({"target": "  "}, "field 'target' is empty"),
    ({"subject": 3}, "field 'subject' must be a string, got int"),
    ({"question": None}, "field 'question' must be a string"),
    ({"synonyms": "pastime"}, "field 'synonyms' must be a list"),
    ({"questions": ("Q1", 2)}, r"field 'questions'\[1\] must be a string"),
    ({"questions": ("Q1", "")}, r"field 'questions'\[1\] is empty"),
    ({"synonyms": ("a",), "questions": ("Q1", "Q2")}, "'synonyms' and 'questions' differ in length"),
    ({"targets": ("T1",)}, "field 'targets' must be empty or parallel"),
    ({"text": 5}, "field 'text' must be a string or null"),
    ({"id": 7}, "field 'id' must be a string or null"),
])
def test_preference_validation(kwargs: dict, pattern: str) -> None:
    base = {"subject": "hobby", "question": "What's my hobby?", "target": "Dancing"}
    with pytest.raises(PreferenceError, match=pattern) as err:
        Preference(**{**base, **kwargs})
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)


def test_validation_message_names_id() -> None:
    with pytest.raises(PreferenceError, match="preference 'p7': field 'target' is empty"):
        Preference("s", "q", "", id="p7")


# ------------------------------------------------------------------------------------------ round trips


def test_to_dict_from_dict_round_trip() -> None:
    p = load_preferences([cluster9()])[0]
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d and isinstance(d["questions"], list)
    assert Preference.from_dict(d) == p
    with pytest.raises(PreferenceError, match="unknown field 'colour'"):
        Preference.from_dict({**d, "colour": "red"})
    with pytest.raises(PreferenceError, match="missing field 'target'"):
        Preference.from_dict({"subject": "s", "question": "q"})


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_save_load_round_trip(tmp_path: Path, suffix: str) -> None:
    prefs = load_preferences([UPQA, cluster9(), PREFEVAL]) + [Preference("pet", "What's my pet?", "A turtle")]
    path = save_preferences(prefs, tmp_path / "sub" / f"prefs{suffix}")
    assert load_preferences(path) == prefs
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    save_preferences(prefs[:1], path)  # atomic overwrite
    assert load_preferences(path) == prefs[:1]
    with pytest.raises(PreferenceError, match="duplicate id"):
        save_preferences(prefs[:1] * 2, tmp_path / "dup.json")


def test_load_formats_from_lists_and_jsonl(tmp_path: Path) -> None:
    flat, clustered, pe = load_preferences([UPQA, cluster9(4), PREFEVAL])
    assert (flat.subject, flat.text, flat.product_question) == ("hobby", UPQA["input_attribute"],
                                                                 UPQA["product_recommendation_question"])
    assert clustered.subject == "hobby" and clustered.synonyms == ("syn0", "syn1", "syn2")
    assert clustered.targets == ("T0", "T1", "T2") and clustered.target == "Dancing at clubs"
    assert (pe.subject, pe.text) == ("destinations", PREFEVAL["preference"])
    jsonl = write(tmp_path, "p.jsonl", json.dumps(UPQA) + "\n\n" + json.dumps(PREFEVAL) + "\n")
    assert load_preferences(jsonl) == [flat, pe]
    assert load_preferences(UPQA) == [flat]  # a single object
    assert load_preferences([flat]) == [flat]


# ------------------------------------------------------------------------------------------ load errors


def bad(item_changes: dict, base: dict = UPQA, drop: str | None = None) -> list:
    item = {**base, **item_changes}
    if drop:
        del item[drop]
    return [base, item]


@pytest.mark.parametrize("items, pattern", [
    (bad({"target": ""}), "item 1: field 'target' is empty"),
    (bad({}, drop="target"), "item 1: missing field 'target'"),
    (bad({}, drop="input_attribute"), "item 1: missing field 'input_attribute'"),
    (bad({"question": 5}), "item 1: field 'question' must be a string, got int"),
    (bad({"question_paraphrased": ["x"]}), "item 1: field 'question_paraphrased' must be a string"),
    (bad({"target": "  "}, base=PREFEVAL), "item 1: field 'target' is empty"),
    (bad({}, base=PREFEVAL, drop="subject"), "item 1: missing field 'subject'"),
    (bad({"preference": None}, base=PREFEVAL), "item 1: field 'preference' must be a string, got NoneType"),
    ([UPQA, "not an object"], "item 1: item is not an object"),
    ([UPQA, {"subject": "s", "question": "q"}], "item 1: missing field 'target'"),
    ([UPQA, {"subject": "s", "question": "q", "target": "t", "oops": 1}], "item 1: unknown field 'oops'"),
    ([UPQA, {"subject": "s", "question": "q", "target": "t", "synonyms": 4}], "item 1: field 'synonyms' must be"),
    ([cluster9(), {**cluster9(), "target": ["a", "b"]}], "item 1: field 'target' has 2 entries"),
    ([{**cluster9(), "question": "What's my hobby?"}], "item 0: field 'question' must be a list"),
    ([{**cluster9(), "target": ["a", "", "c"]}], r"item 0: field 'target'\[1\] is empty"),
    ([{**cluster9(), "attribute_type": []}], "item 0: field 'attribute_type' must be a non-empty list"),
    ([UPQA, dict(UPQA)], "duplicate id '[0-9a-f]+' \\(items 0 and 1\\)"),
    ([], "no preferences"),
    (42, "expected a list"),
])
def test_load_errors_name_item_and_field(items, pattern: str) -> None:
    with pytest.raises(PreferenceError, match=pattern) as err:
        load_preferences(items)
    assert str(err.value).startswith("<list>: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("name, content, pattern", [
    ("upqa.json", json.dumps([UPQA] * 3 + [{**UPQA, "target": ""}]), r"^upqa\.json: item 3: field 'target' is empty$"),
    ("empty.json", "  \n", r"^empty\.json: file is empty$"),
    ("empty_list.json", "[]", r"^empty_list\.json: no preferences"),
    ("broken.json", '[\n{"a": 1},\n{oops}\n]', r"^broken\.json: malformed JSON at line 3"),
    ("broken.jsonl", json.dumps(UPQA) + "\n{not json\n", r"^broken\.jsonl: malformed JSON at line 2"),
    ("lines.jsonl", json.dumps(UPQA) + "\n\n" + json.dumps({**PREFEVAL, "subject": ""}),
     r"^lines\.jsonl: item 1 \(line 3\): field 'subject' is empty$"),
    ("scalar.json", "7", r"^scalar\.json: expected a list of preference objects, got int$"),
])
def test_file_errors(tmp_path: Path, name: str, content: str, pattern: str) -> None:
    with pytest.raises(PreferenceError, match=pattern):
        load_preferences(write(tmp_path, name, content))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PreferenceError, match=r"nope\.json: file not found"):
        load_preferences(tmp_path / "nope.json")
    with pytest.raises(PreferenceError, match="file not found"):
        load_preferences(str(tmp_path))


# ------------------------------------------------------------------------------------------ prompt sets

PERSONAL = re.compile(r"\b(i|me|my|mine|myself|you|your|yours|we|our)\b", re.IGNORECASE)


@pytest.mark.parametrize("name, minimum", [("neutral_prompts", 80), ("distractor_questions", 30),
                                           ("context_prefixes", 20)])
def test_prompt_sets(name: str, minimum: int) -> None:
    prompts = load_prompt_set(name)
    assert len(prompts) >= minimum and len(set(prompts)) == len(prompts)
    assert all(isinstance(p, str) and p.strip() == p and p for p in prompts)
    prompts.append("mutated")
    assert load_prompt_set(name)[-1] != "mutated"  # callers get a fresh list
    if name != "context_prefixes":
        assert not [p for p in prompts[:-1] if PERSONAL.search(p)]


def test_prompt_set_shapes() -> None:
    neutral = load_prompt_set("neutral_prompts")
    short = [p for p in neutral if p.endswith("?") and len(p) <= 60]
    assert len(short) >= len(neutral) // 2
    assert len([p for p in neutral[:48] if p in short]) >= 20  # the head (used for calibration) is mixed too
    assert all(q.endswith("?") for q in load_prompt_set("distractor_questions"))
    assert not set(neutral) & set(load_prompt_set("distractor_questions"))
    assert all(len(p) <= 60 for p in load_prompt_set("context_prefixes"))
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompt_set("nope")
    assert set(PROMPT_SETS) == {"neutral_prompts", "distractor_questions", "context_prefixes", "request_templates"}
    requests = load_prompt_set("request_templates")
    assert len(requests) >= 4 and all(r.count("{subject}") == 1 for r in requests)
    upqa = {q.lower() for p in load_preferences(dataset_path("upqa_dev")) for q in
            (p.question, p.paraphrased_question, p.implicit_question, p.product_question) if q}
    assert not {r.format(subject=s).lower() for r in requests for s in ("hobby", "pet", "job")} & upqa  # no UPQA text


# ------------------------------------------------------------------------------------------ length limits


@pytest.mark.parametrize("kwargs, pattern", [
    ({"target": "x" * 10_000}, r"field 'target' is 10,000 characters long; the limit is 512 "
                               r"\(peft_persedit.preferences.MAX_TARGET_CHARS\)"),
    ({"question": "Q" * 1001}, r"field 'question' is 1,001 characters long; the limit is 1,000 .*MAX_QUESTION_CHARS"),
    ({"questions": ("Q1", "Q" * 2000)}, r"field 'questions'\[1\] is 2,000 characters long"),
    ({"questions": ("Q1",), "targets": ("t" * 513,)}, r"field 'targets'\[0\] is 513 characters long"),
    ({"implicit_question": "Q" * 1001}, r"field 'implicit_question' is 1,001 characters"),
    ({"subject": "s" * 201}, r"field 'subject' is 201 characters long; the limit is 200 .*MAX_SUBJECT_CHARS"),
])
def test_length_limits(kwargs: dict, pattern: str) -> None:
    base = {"subject": "hobby", "question": "What's my hobby?", "target": "Dancing", "id": "p1"}
    with pytest.raises(PreferenceError, match=rf"preference 'p1': {pattern}"):
        Preference(**{**base, **kwargs})


def test_length_limits_name_file_item_and_can_be_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    item = {"subject": "hobby", "question": "What's my hobby?", "target": "x" * 600}
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps([{**item, "target": "Dancing"}, item]))
    with pytest.raises(PreferenceError, match=r"prefs.json: item 1: field 'target' is 600 characters long; the "
                                              r"limit is 512"):
        load_preferences(path)
    with pytest.raises(PreferenceError, match=r"preference \(subject 'hobby'\): field 'target' is 600"):
        Preference(**item)
    monkeypatch.setattr("peft_persedit.preferences.MAX_TARGET_CHARS", 1000)
    assert len(load_preferences(path)[1].target) == 600
    assert len(Preference("s", "q", "t" * 512).target) == 512  # the limits are inclusive
