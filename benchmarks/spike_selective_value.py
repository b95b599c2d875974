"""Spike (issue 10): can the value itself be selective, so that a loose scope gate is enough?

    PYTHONPATH=.:benchmarks python benchmarks/spike_selective_value.py --layer 12 --out benchmarks/results/spike_topic

Per balanced100 preference (``--prefs``, one per attribute type first): one shift δ at the generation prompt
("<|im_start|>assistant\\n") of layer L's MLP output, fit so that the target is said after each of its cluster9
variant questions (none equal to an evaluated question), with KL rows that keep the first answer token's
distribution on hard negatives: other types' variant questions and calibration neutral prompts (none of them
evaluated). Then δ is added at the generation prompt of *every* chat (no gate at all) and we count the target
on the preference's evaluated questions and the unchanged greedy answers on the 50 held-out neutral prompts and on
other subjects' literal questions (the eval's locality_other probes). If δ alone kept those unchanged, any scope
that fires on the topic would do.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from peft import get_peft_model
from spike_router_gate import training_items
from spike_topic_data import DATA, EVAL_FIELDS, variant_questions
from spike_topic_eval import METRICS as FIELDS

import peft_persedit.editing.values as values_module
from peft_persedit.editing.chat import encode, pad_id
from peft_persedit.editing.selftext import HELD_OUT_PROMPTS
from peft_persedit.editing.value_chunks import Row, ValueRequest
from peft_persedit.evaluation.generation import generate_chats, make_chat, render
from peft_persedit.evaluation.scoring import target_hit
from peft_persedit.prompts import load_prompt_set

SPAN = 4  # "<|im_start|>", "ass", "istant", "\n"


def with_kl_rows(negatives: dict[int, list[list[int]]], weight: float):
    """``value_rows`` plus, per request i, one KL row per sequence in ``negatives[i]`` (δ on its last SPAN
    tokens, KL at the first answer token)."""
    original = values_module.value_rows

    def value_rows(requests, kl_weight=0.0, continuation_weight=0.0):
        rows = original(requests, kl_weight, continuation_weight)
        for i, seqs in negatives.items():
            for ids in seqs:
                s = len(ids) - SPAN
                rows.append(Row(i, list(ids[:s]), list(ids[s:]), [SPAN - 1], [-1], True, weight=weight))
        return rows

    return value_rows


class PromptShift:
    """Forward hook: on a prefill (more than one position), adds δ at the last SPAN positions of every row."""

    def __init__(self) -> None:
        self.delta: torch.Tensor | None = None

    def __call__(self, module, args, output):
        if self.delta is None or output.shape[1] == 1:
            return output
        output = output.clone()
        output[:, -SPAN:] += self.delta.to(output.dtype)
        return output


def greedy(model, tokenizer, questions: list[str]) -> list[list[int]]:
    """Greedy answer ids (24 tokens, cut after the first end of turn) to each question in a fresh chat."""
    return [g.ids for g in generate_chats(model, tokenizer, [make_chat(q) for q in questions])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--prefs", type=int, default=10)
    parser.add_argument("--negatives", type=int, default=30, help="KL rows per preference (half other types)")
    parser.add_argument("--kl-weight", type=float, default=0.1, help="per KL row")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--clamp", type=float, default=4.0)
    parser.add_argument("--type-requests", type=int, default=0,
                        help="also fit δ on this many implicit / product questions of other dev items of the same "
                             "attribute type (no balanced100 item, no evaluated string)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from peft_persedit import PersonalizationEditConfig, load_default_model

    torch.manual_seed(0)
    rng = random.Random(0)
    model, tokenizer = load_default_model()
    b100 = json.loads((DATA / "upqa_balanced100.json").read_text())
    c9 = json.loads((DATA / "upqa_balanced100_cluster9.json").read_text())
    types = [x["attribute_type"] for x in b100]
    picked = sorted({t: i for i, t in reversed(list(enumerate(types)))}.values())[: args.prefs]
    neutral = load_prompt_set("neutral_prompts")
    held, calib = neutral[:HELD_OUT_PROMPTS], neutral[HELD_OUT_PROMPTS:]

    def seq(q: str) -> list[int]:
        return render(tokenizer, make_chat(q))

    requests_bank = training_items(b100, json.loads((DATA / "upqa_dev.json").read_text()), (), EVAL_FIELDS[1:])
    requests, negatives = [], {}
    for j, i in enumerate(picked):
        bank = [q for q, t in requests_bank if t == types[i]]  # implicit / product questions of its type
        asked = variant_questions(c9[i]) + rng.sample(bank, min(args.type_requests, len(bank)))
        requests.append(ValueRequest([(seq(q), len(seq(q)) - SPAN) for q in asked],
                                     encode(tokenizer, b100[i]["target"])))
        other = [q for k in range(len(b100)) if types[k] != types[i] for q in variant_questions(c9[k])]
        half = args.negatives // 2
        if args.negatives:
            negatives[j] = [seq(q) for q in rng.sample(other, half) + rng.sample(calib, args.negatives - half)]
    pm = get_peft_model(model, PersonalizationEditConfig()).eval()
    module = model.model.layers[args.layer].mlp.down_proj
    values_module.value_rows = with_kl_rows(negatives, args.kl_weight)
    start = time.perf_counter()
    result = values_module.optimize_values(pm, module, requests, pad_id(tokenizer), steps=args.steps, lr=args.lr,
                                           kl_weight=0.0, clamp_norm_factor=args.clamp, span=SPAN)
    seconds = time.perf_counter() - start
    others = {i: sorted({b100[k]["question"] for k in range(len(b100)) if types[k] != types[i]}) for i in picked}
    probes = sorted(set(held) | {q for qs in others.values() for q in qs})
    base = dict(zip(probes, greedy(pm, tokenizer, probes)))
    shift = PromptShift()
    handle = module.register_forward_hook(shift)
    rows: dict[str, list[float]] = {}
    try:
        for j, i in enumerate(picked):
            shift.delta = result.deltas[j]
            own = [b100[i][f] for f in FIELDS.values()]
            asked = own + held + others[i]
            answers = greedy(pm, tokenizer, asked)
            for metric, answer in zip(FIELDS, answers):
                rows.setdefault(metric, []).append(float(target_hit(tokenizer.decode(answer), b100[i]["target"])))
            n = len(own)
            rows.setdefault("locality_neutral", []).append(
                sum(a == base[q] for q, a in zip(held, answers[n:n + len(held)])) / len(held))
            rows.setdefault("locality_other", []).append(
                sum(a == base[q] for q, a in zip(others[i], answers[n + len(held):])) / len(others[i]))
    finally:
        handle.remove()
    summary = {m: round(sum(v) / len(v), 3) for m, v in rows.items()}
    summary |= {"value_seconds": round(seconds, 1), "final_nll": [round(float(x), 3) for x in result.final_nll],
                "args": {k: str(v) for k, v in vars(args).items()}}
    print(json.dumps(summary))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"selective_value_L{args.layer}_kl{args.kl_weight}_n{args.negatives}_t{args.type_requests}.json"
        (args.out / name).write_text(json.dumps(summary | {"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
