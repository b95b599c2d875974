"""Editing-engine benchmark on the embedded SmolLM2-135M-Instruct (CPU), UPQA balanced100.

Prints and saves (``--out``, default benchmarks/results/edit):
  * efficacy / paraphrase / implicit accuracy of persedit (gated, clustered; every item = one user, all
    users edited in one batched call), ungated ROME (gate="none", no C, one edit per preference) and no edit;
  * locality: share of 50 generic prompts whose greedy output is unchanged after all preferences are in
    ONE adapter (the union of the per-user banks: clusters are solved and gated independently);
  * the time of each pipeline stage, and the ratio of persedit's edit time per preference vs. the paper's
    sequential ROME-per-synonym (one ungated edit per synonym question, run on ``--rome-items`` items).

  * sequential safety: one user edited in 10 rounds of 10 (UPQA dev, distinct subjects); round-1 efficacy
    after round 1 vs. after round 10.

    python benchmarks/bench_edit.py [--limit 100] [--rome-items 3] [--rounds 10 --per-round 10]
                                    [--sections persedit,rome,sequential,rome_per_synonym]

``--sections`` runs a subset and updates only those entries of an existing results.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from peft import get_peft_model

from peft_persedit import PersonalizationEditConfig, load_default_model
from peft_persedit.data_paths import dataset_path
from peft_persedit.editing import PersonalizationEditor
from peft_persedit.editing.verify import answer_questions, target_hit
from peft_persedit.preferences import Preference, load_preferences
from peft_persedit.prompts import load_prompt_set

SECTIONS = ("persedit", "rome", "sequential", "rome_per_synonym")
QUESTION_KINDS = {"efficacy": "question", "paraphrase": "paraphrased_question", "implicit": "implicit_question"}


def accuracy(pm, tokenizer, prefs: list[Preference], adapters: list[str]) -> dict[str, float]:
    """Target-substring accuracy of each question kind, row i answered with ``adapters[i]``."""
    out = {}
    for name, attr in QUESTION_KINDS.items():
        answers = answer_questions(pm, tokenizer, [getattr(p, attr) for p in prefs], adapters)
        out[name] = sum(target_hit(a, p.target) for a, p in zip(answers, prefs)) / len(prefs)
    return out


@torch.no_grad()
def union_adapter(pm, sources: list[str], name: str) -> None:
    """Copy every cluster of ``sources`` into one new adapter ``name`` (same layers, gates and τ)."""
    pm.add_adapter(name, PersonalizationEditConfig(**{
        k: v for k, v in pm.peft_config[sources[0]].to_dict().items()
        if k in ("target_modules", "layers_to_transform", "gate")}))
    for layer in pm.base_model.edit_layers().values():
        for source in sources:
            bank = layer.bank(source)
            if layer.num_keys(name) == 0:
                layer.set_center(name, bank.center)
            # keys are stored unit and centred; add_clusters centres them again with the same μ
            layer.add_clusters(name, keys=bank.keys.float() + bank.center.float(), key_cluster=bank.key_cluster,
                               tau=bank.tau, A=bank.A, B=bank.B, rank_cluster=bank.rank_cluster, shift=bank.shift)


def edit_all(pm, tokenizer, prefs: list[Preference], prefix: str, template: str) -> tuple[list[str], dict]:
    """Every preference its own user adapter (config copied from ``template``), edited in one batched call."""
    users = {f"{prefix}{i}": [p] for i, p in enumerate(prefs)}
    start = time.perf_counter()
    report = PersonalizationEditor(pm, tokenizer, adapter_name=template).edit_users(users, verify=False)
    report.timings["total"] = time.perf_counter() - start
    return list(users), report.timings


def rome_per_synonym(pm, tokenizer, items: list[Preference], config: PersonalizationEditConfig) -> float:
    """Seconds per preference of the paper's procedure: one ungated edit per synonym question, in sequence."""
    start = time.perf_counter()
    for i, pref in enumerate(items):
        pm.add_adapter(f"rps{i}", copy.deepcopy(config))
        editor = PersonalizationEditor(pm, tokenizer, adapter_name=f"rps{i}", progress=False)
        members = list(zip((pref.question, *pref.questions), (pref.subject, *pref.synonyms)))
        for j, (question, subject) in enumerate(members):
            editor.edit([Preference(subject, question, pref.target, id=f"{pref.id}-{j}")], verify=False)
    return (time.perf_counter() - start) / len(items)


def distinct_subject_items(limit: int) -> list[Preference]:
    """UPQA-dev preferences with pairwise distinct subjects and questions (one user can hold them all)."""
    chosen: dict[str, Preference] = {}
    questions: set[str] = set()
    for pref in load_preferences(dataset_path("upqa_dev")):
        if pref.subject.lower() not in chosen and pref.question.lower() not in questions:
            chosen[pref.subject.lower()] = pref
            questions.add(pref.question.lower())
    return list(chosen.values())[:limit]


def sequential_rounds(pm, tokenizer, rounds: int, per_round: int) -> dict[str, float]:
    """One user edited in ``rounds`` rounds of ``per_round``: round-1 efficacy right after round 1 and at the end."""
    prefs = distinct_subject_items(rounds * per_round)
    pm.add_adapter("seq", PersonalizationEditConfig())
    editor = PersonalizationEditor(pm, tokenizer, adapter_name="seq", progress=False)
    first = prefs[:per_round]
    efficacy_after_round_1 = editor.edit(first).efficacy
    for r in range(1, rounds):
        editor.edit(prefs[r * per_round:(r + 1) * per_round], verify=False)
    answers = answer_questions(pm, tokenizer, [p.question for p in first], ["seq"] * len(first))
    final = sum(target_hit(a, p.target) for a, p in zip(answers, first)) / len(first)
    all_answers = answer_questions(pm, tokenizer, [p.question for p in prefs], ["seq"] * len(prefs))
    overall = sum(target_hit(a, p.target) for a, p in zip(all_answers, prefs)) / len(prefs)
    pm.delete_adapter("seq")
    return {"round1_efficacy_after_round1": efficacy_after_round_1, "round1_efficacy_after_all": final,
            "efficacy_all_preferences": overall, "preferences": len(prefs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--rome-items", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10, help="sequential-safety rounds (of --per-round)")
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/edit")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS) or (("rome_per_synonym" in sections) and "persedit" not in sections
                                         and not (Path(args.out) / "results.json").is_file()):
        parser.error(f"--sections must be a subset of {','.join(SECTIONS)} (rome_per_synonym needs persedit's time)")
    torch.set_num_threads(2)
    model, tokenizer = load_default_model()
    prefs = load_preferences(dataset_path("upqa_balanced100"))[: args.limit]
    cluster9 = load_preferences(dataset_path("upqa_balanced100_cluster9"))[: args.rome_items]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = json.loads((out / "results.json").read_text()) if sections != set(SECTIONS) else {}
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    command = f"python benchmarks/bench_edit.py {flags}"
    results["limit"] = args.limit
    if sections == set(SECTIONS):
        results["command"] = command
    else:  # the entries of these sections come from this later command
        results.setdefault("reruns", {}).update({section: command for section in sorted(sections)})

    def save() -> None:  # after every section, so a long run leaves what it measured so far
        (out / "results.json").write_text(json.dumps(results, indent=2))

    pm = get_peft_model(model, PersonalizationEditConfig(), adapter_name="default").eval()
    neutral = load_prompt_set("neutral_prompts")[:50]
    base_out = answer_questions(pm, tokenizer, neutral, ["__base__"] * len(neutral))
    if "persedit" in sections:
        results["no_edit"] = accuracy(pm, tokenizer, prefs, ["__base__"] * len(prefs))
        users, results["persedit_timings"] = edit_all(pm, tokenizer, prefs, "u", "default")
        results["persedit"] = accuracy(pm, tokenizer, prefs, users)
        union_adapter(pm, users, "all")
        all_out = answer_questions(pm, tokenizer, neutral, ["all"] * len(neutral))
        results["locality_all_in_one"] = sum(a == b for a, b in zip(base_out, all_out)) / len(neutral)
        save()
        for user in [*users, "all"]:
            pm.delete_adapter(user)

    rome_cfg = PersonalizationEditConfig(gate="none", mom2="none", synonyms=0, contexts=0, request_templates=0,
                                         value_histories=[], key_histories=[])
    if "rome" in sections:
        pm.add_adapter("rome_cfg", copy.deepcopy(rome_cfg))
        rome_users, results["rome_timings"] = edit_all(pm, tokenizer, prefs, "r", "rome_cfg")
        results["rome_ungated"] = accuracy(pm, tokenizer, prefs, rome_users)
        rome_all = answer_questions(pm, tokenizer, neutral, rome_users[:1] * len(neutral))
        results["rome_locality_one_edit"] = sum(a == b for a, b in zip(base_out, rome_all)) / len(neutral)
        save()
        for user in rome_users:
            pm.delete_adapter(user)

    if "sequential" in sections and args.rounds:
        results["sequential"] = sequential_rounds(pm, tokenizer, args.rounds, args.per_round)
        save()
    if "rome_per_synonym" in sections:
        per_pref_rome = rome_per_synonym(pm, tokenizer, cluster9, rome_cfg)
        per_pref_persedit = results["persedit_timings"]["total"] / args.limit
        results["seconds_per_preference"] = {"persedit_batched": per_pref_persedit, "rome_per_synonym": per_pref_rome}
        results["speedup_vs_rome_per_synonym"] = per_pref_rome / per_pref_persedit
        save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
