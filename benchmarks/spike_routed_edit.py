"""Spike (issue 10): a routed edit end to end, router gate × generation-prompt shift, on all balanced100 items.

    PYTHONPATH=.:benchmarks python benchmarks/spike_routed_edit.py --offsets 0.1 0.15 --out DIR

Per balanced100 preference (single users): the router gate of ``spike_router_gate.py`` (layer L, competitive,
τ_i = max over calibration neutral prompts + o; "seen" and "held-out" routers) decides, per chat, whether the
preference's shift fires; the shift is ``spike_selective_value.py``'s δ_i at the generation prompt of layer L's MLP
output, fit on the preference's cluster9 variant questions (no KL rows: the gate alone keeps the rest untouched).
A chat the gate does not fire on is the base model's. Reports the target rate on the evaluated questions
(exact substring, greedy, 24 tokens) and the unchanged share of the 50 held-out neutral prompts and of other
subjects' literal questions, for held-out-type and seen-type items. No evaluated question is a key, value prompt or
router training string.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import get_peft_model
from spike_router_gate import HELD_OUT_TYPES, N_TAIL, study_setup
from spike_selective_value import FIELDS, SPAN, PromptShift, greedy
from spike_topic_data import variant_questions

import peft_persedit.editing.values as values_module
from peft_persedit.editing.chat import encode, pad_id
from peft_persedit.editing.scope import tail_inputs, train_router
from peft_persedit.editing.value_chunks import ValueRequest
from peft_persedit.evaluation.generation import make_chat, render
from peft_persedit.evaluation.scoring import target_hit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--offsets", type=float, nargs="+", default=[0.1])
    parser.add_argument("--rho", type=float, default=0.7)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--grouped", action="store_true",
                        help="10 users of 10 preferences (one per type): the best-scoring shift of a user fires")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from peft_persedit import PersonalizationEditConfig

    model, tokenizer, data = study_setup()
    b100, c9, types, regimes, others = data["b100"], data["c9"], data["types"], data["regimes"], data["others"]
    held, train_neg, calib, texts = data["held"], data["train_neg"], data["calib"], data["texts"]
    seq = {t: render(tokenizer, make_chat(t)) for t in texts}
    module = model.model.layers[args.layer].mlp.down_proj
    feats = tail_inputs(model, module, [seq[t] for t in texts], pad_id(tokenizer), N_TAIL, desc="features")
    row = {t: i for i, t in enumerate(texts)}

    pm = get_peft_model(model, PersonalizationEditConfig()).eval()
    requests = [ValueRequest([(seq[q], len(seq[q]) - SPAN) for q in variant_questions(c9[i])],
                             encode(tokenizer, b100[i]["target"])) for i in range(100)]
    start = time.perf_counter()
    deltas = values_module.optimize_values(pm, module, requests, pad_id(tokenizer), steps=args.steps, lr=0.5,
                                           kl_weight=0.0, span=SPAN).deltas
    value_seconds = time.perf_counter() - start
    by_type = {t: [i for i in range(100) if types[i] == t] for t in dict.fromkeys(types)}
    users = [[items[g] for items in by_type.values()] for g in range(10)] if args.grouped else [[i] for i in range(100)]
    probes = sorted(set(held) | {q for qs in others.values() for q in qs})
    base = dict(zip(probes, greedy(pm, tokenizer, probes)))
    shift = PromptShift()
    handle = module.register_forward_hook(shift)
    answers: dict[tuple[int, str], list[int]] = {}  # (preference, question) → greedy ids with its shift

    def shifted(i: int, question: str) -> list[int]:
        if (i, question) not in answers:
            shift.delta = deltas[i]
            answers[(i, question)] = greedy(pm, tokenizer, [question])[0]
            shift.delta = None
        return answers[(i, question)]

    table = {}
    try:
        for regime, pairs in regimes.items():
            labels_of = sorted({t for _, t in pairs})
            x = torch.cat([feats[[row[q] for q, _ in pairs]], feats[[row[q] for q in train_neg]]])
            y = torch.tensor([labels_of.index(t) for _, t in pairs] + [-1] * len(train_neg))
            router = train_router(x.reshape(-1, x.shape[-1]), y.repeat_interleave(N_TAIL), args.layer,
                                  progress=False)

            def z(strings: list[str], router=router) -> torch.Tensor:
                return router.project(feats[[row[s] for s in strings]])

            anchors = torch.stack([torch.nn.functional.normalize(z([q for q, u in pairs if u == t]).mean((0, 1)),
                                                                 dim=0) for t in labels_of])
            for offset in args.offsets:
                margins = []  # per preference: questions → best s − τ over the tokens that fire (−inf: none)
                for i in range(100):
                    keys = z(variant_questions(c9[i])).reshape(-1, anchors.shape[1])
                    rivals = anchors[(anchors @ torch.nn.functional.normalize(keys.mean(0), dim=0)) < args.rho]
                    tau = float((z(calib) @ keys.T).amax()) + offset

                    def margin(questions: list[str], keys=keys, rivals=rivals, tau=tau) -> torch.Tensor:
                        zq = z(questions)
                        s, r = (zq @ keys.T).amax(-1), (zq @ rivals.T).amax(-1)
                        return (s - tau).masked_fill((s < tau) | (s <= r), float("-inf")).amax(-1)

                    margins.append(margin)
                cells: dict[str, dict[str, list[float]]] = {}
                for members in users:
                    def route(questions: list[str], members=members, margins=margins) -> list[int | None]:
                        """The member whose shift fires on each question (the best margin), or None."""
                        best, who = torch.stack([margins[i](questions) for i in members]).max(0)
                        return [members[k] if m > float("-inf") else None for m, k in zip(best.tolist(), who.tolist())]

                    for i in members:
                        group = cells.setdefault("held-out types" if types[i] in HELD_OUT_TYPES
                                                 + ("entertainment preference",) else "seen types", {})
                        own = [b100[i][f] for f in FIELDS.values()]
                        for metric, question, chosen in zip(FIELDS, own, route(own)):
                            hit = chosen is not None and target_hit(tokenizer.decode(shifted(chosen, question)),
                                                                    b100[i]["target"])
                            group.setdefault(metric, []).append(float(hit))
                            group.setdefault(f"{metric}_fired", []).append(float(chosen is not None))
                        probes_of = [("locality_neutral", held)]
                        if len(members) == 1:  # grouped users hold every subject: no other-subject probes
                            probes_of.append(("locality_other", others[i]))
                        for metric, qs in probes_of:
                            same = [c is None or shifted(c, q) == base[q] for q, c in zip(qs, route(qs))]
                            group.setdefault(metric, []).append(sum(same) / len(same))
                grouped = " grouped" if args.grouped else ""
                name = f"L{args.layer} {regime} router, max+{offset}, competitive{grouped}"
                table[name] = {g: {m: round(sum(v) / len(v), 3) for m, v in c.items()} for g, c in cells.items()}
                print(name, json.dumps(table[name]), flush=True)
    finally:
        handle.remove()
    table["value_seconds_100_prefs"] = round(value_seconds, 1)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"routed_edit_L{args.layer}{'_grouped' if args.grouped else ''}.json"
        (args.out / name).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
