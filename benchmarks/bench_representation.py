"""Representation edits (CHAMELEON-style, no labels) next to the other methods on PrefEval-pro, embedded SmolLM2.

Every preference is one user (its own adapter); all users of a method are edited in one batched call.
Methods: no edit; in-context (the preference stated in the system prompt, as during self-generation); the
engine (``method="rome"``, which uses the target answer); representation edits gated by keys and always on.

Reports (``--out``, default benchmarks/results/representation/results.json): efficacy (target substring in the
greedy answer to the preference's question), target-word recall (share of the target's words of ≥ 3 letters in
that answer), ``ll_gain`` (mean per-token log-likelihood of the in-context answer to the question under the
method minus under the base model: how far the method moves the model towards what it writes when told the
preference; the representation edits saw that question while fitting, so this one is in-sample for them),
locality (share of held-out generic prompts answered exactly as without edit; prompt j by user j mod N), edit
seconds per preference, and the chosen α per preference.

    python benchmarks/bench_representation.py [--limit 10]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).parent))
from bench_groups import write_results  # noqa: E402

from peft_persedit import PersonalizationEditConfig, load_default_model  # noqa: E402
from peft_persedit.data_paths import dataset_path
from peft_persedit.editing import PersonalizationEditor
from peft_persedit.editing.chat import pad_id
from peft_persedit.editing.representation import SYSTEM_TEMPLATE, read_back, response_log_likelihood, statement
from peft_persedit.editing.verify import answer_questions, target_hit
from peft_persedit.preferences import load_preferences
from peft_persedit.prompts import load_prompt_set

METHODS = {"rome": {"method": "rome"},
           "representation_keys": {"method": "representation", "gate": "keys"},
           "representation_always": {"method": "representation", "gate": "always"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=10, help="PrefEval-pro items (evenly spaced over topics)")
    parser.add_argument("--fit-prompts", type=int, default=6)
    parser.add_argument("--select-prompts", type=int, default=2)
    parser.add_argument("--locality", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--out", default="benchmarks/results/representation")
    args = parser.parse_args()
    torch.set_num_threads(2)
    every = load_preferences(dataset_path("prefeval_pro100"))
    prefs = every[:: max(1, len(every) // args.limit)][: args.limit]
    model, tokenizer = load_default_model()
    pm = get_peft_model(model, PersonalizationEditConfig(), adapter_name="template").eval()
    results: dict = {"command": "python " + " ".join(sys.argv), "args": vars(args), "items": [p.id for p in prefs]}
    questions = [p.question for p in prefs]
    neutral = load_prompt_set("neutral_prompts")[: args.locality]
    base_neutral = answer_questions(pm, tokenizer, neutral, ["__base__"] * len(neutral), max_new_tokens=24)

    def scores(answers: list[str], adapters: list[str]) -> dict[str, float]:
        words = [[w for w in re.findall(r"[a-z]+", p.target.lower()) if len(w) > 2] for p in prefs]
        recall = [sum(w in a.lower() for w in ws) / max(1, len(ws)) for ws, a in zip(words, answers)]
        ll = response_log_likelihood(pm, texts, pad_id(tokenizer), adapters)
        return {"efficacy": sum(target_hit(a, p.target) for a, p in zip(answers, prefs)) / len(prefs),
                "target_word_recall": sum(recall) / len(prefs), "ll_gain": float((ll - base_ll).mean())}

    base_rows = ["__base__"] * len(prefs)
    in_context = [answer_questions(pm, tokenizer, [p.question], max_new_tokens=args.max_new_tokens,
                                   system=SYSTEM_TEMPLATE.format(statement=statement(p)))[0] for p in prefs]
    texts = read_back(tokenizer, questions, in_context)
    base_ll = response_log_likelihood(pm, texts, pad_id(tokenizer), base_rows)
    answers = answer_questions(pm, tokenizer, questions, base_rows, max_new_tokens=args.max_new_tokens)
    results["no_edit"] = {**scores(answers, base_rows), "answers": answers}
    results["in_context"] = {**scores(in_context, base_rows), "ll_gain": None, "answers": in_context}
    print(json.dumps(results), flush=True)
    options = {"fit_prompts": args.fit_prompts, "select_prompts": args.select_prompts}
    for name, spec in METHODS.items():
        users = {f"{name}_{i}": [p] for i, p in enumerate(prefs)}
        editor = PersonalizationEditor(pm, tokenizer, adapter_name="template", progress=False)
        extra = {k: v for k, v in spec.items() if k != "method"}
        if spec["method"] == "representation":
            extra.update(options)
        start = time.perf_counter()
        report = editor.edit_users(users, verify=False, method=spec["method"], **extra)
        seconds = time.perf_counter() - start
        adapters = list(users)
        answers = answer_questions(pm, tokenizer, questions, adapters, max_new_tokens=args.max_new_tokens)
        routed = [adapters[j % len(adapters)] for j in range(len(neutral))]
        local = answer_questions(pm, tokenizer, neutral, routed, max_new_tokens=24)
        results[name] = {**scores(answers, adapters), "seconds_per_preference": seconds / len(prefs),
                         "locality": sum(a == b for a, b in zip(base_neutral, local)) / len(neutral),
                         "timings": report.timings, "answers": answers}
        if spec["method"] == "representation":
            results[name]["alpha"] = [pm.peft_config[a].preferences[0]["alpha"] for a in adapters]
        print(json.dumps({name: results[name]}), flush=True)
    write_results(results, args.out)


if __name__ == "__main__":
    main()
