"""Router-only study (issue 10): does a learned scope separate a preference's topic well enough, for attribute
types the router saw in training and for types it did not, with a threshold or a competitive gate?

    PYTHONPATH=.:benchmarks python benchmarks/spike_router_gate.py --layers 12 18 --out benchmarks/results/spike_topic

Router training items: UPQA dev minus the balanced100 items, minus every question string equal to an evaluated
balanced100 question (paraphrase, implicit, product), so no evaluated text is trained on; "seen" keeps the other
items of balanced100's types, "held-out" also drops every item of ``HELD_OUT_TYPES``. Negatives: held-in neutral
prompts and the distractor questions. Features: the edit layer's input at the last ``N_TAIL`` tokens of the chat
(the question's end and the generation prompt). Per balanced100 preference i: keys = projections of its cluster9
variant questions (none equal to an evaluated question); s_i(q) = max over tokens and keys of z·K.

Gates: ``threshold``: s_i ≥ τ_i, τ_i = the (1 − q)-quantile of s_i over calibration neutral prompts (or their
maximum + o);
``competitive``: additionally s_i > max_a z·A_a + m over the router's training-type prototypes A_a (DPL-style
representative users) that are not i's own topic (cos(A_a, mean key of i) < ρ). Reports the share of i's evaluated
questions that fire and the false fire on the 50 held-out neutral prompts and on other preferences' literal
questions (other subjects: the eval's locality_other probes). Single-protocol view; no edit is made.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from spike_topic_data import DATA, EVAL_FIELDS, variant_questions

from peft_persedit.editing.chat import pad_id
from peft_persedit.editing.scope import tail_inputs, train_router
from peft_persedit.editing.selftext import HELD_OUT_PROMPTS
from peft_persedit.evaluation.generation import make_chat, render
from peft_persedit.prompts import load_prompt_set

HELD_OUT_TYPES = ("hobby", "pet", "location", "music preference", "career goal")
N_TAIL = 6  # "?", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n" (SmolLM2's template)
METRICS = dict(zip(("generalization", "implicit", "product"), EVAL_FIELDS))


def training_items(b100: list[dict], dev: list[dict], hold_out: tuple[str, ...],
                   fields: tuple[str, ...] = ("question",) + EVAL_FIELDS) -> list[tuple[str, str]]:
    """(question, attribute type) pairs of dev's ``fields`` for the router: no balanced100 item, no evaluated
    string, no type in ``hold_out``."""
    own = {(x["input_attribute"], x["target"]) for x in b100}
    evaluated = {x[f].strip().lower() for x in b100 for f in EVAL_FIELDS}
    pairs = {(x[f], x["attribute_type"]) for x in dev if (x["input_attribute"], x["target"]) not in own
             and x["attribute_type"] not in hold_out for f in fields if x[f].strip().lower() not in evaluated}
    return sorted(pairs)


def study_data() -> dict:
    """balanced100, its cluster9 entries, the neutral splits (held-out locality prompts, router negatives,
    calibration), both routers' training pairs, per item the other subjects' literal questions, and every text
    the studies read features of."""
    b100 = json.loads((DATA / "upqa_balanced100.json").read_text())
    c9 = json.loads((DATA / "upqa_balanced100_cluster9.json").read_text())
    dev = json.loads((DATA / "upqa_dev.json").read_text())
    neutral = load_prompt_set("neutral_prompts")
    rest = neutral[HELD_OUT_PROMPTS:]
    types = [x["attribute_type"] for x in b100]
    data = {"b100": b100, "c9": c9, "types": types, "held": neutral[:HELD_OUT_PROMPTS],
            "train_neg": rest[::2] + load_prompt_set("distractor_questions"), "calib": rest[1::2],
            "regimes": {"seen": training_items(b100, dev, ()), "held-out": training_items(b100, dev, HELD_OUT_TYPES)},
            "others": {i: sorted({b100[k]["question"] for k in range(len(b100)) if types[k] != types[i]})
                       for i in range(len(b100))}}
    data["texts"] = sorted({q for pairs in data["regimes"].values() for q, _ in pairs} | set(data["train_neg"])
                           | set(data["calib"]) | set(data["held"]) | {q for x in c9 for q in variant_questions(x)}
                           | {x[f] for x in b100 for f in ("question",) + EVAL_FIELDS})
    return data


def study_setup() -> tuple:
    """(model, tokenizer, :func:`study_data`) with the embedded model, seeded."""
    from peft_persedit import load_default_model

    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    return model, tokenizer, study_data()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 18])
    parser.add_argument("--quantiles", type=float, nargs="*", default=[0.0, 0.02, 0.05, 0.1])
    parser.add_argument("--margins", type=float, nargs="*", default=[0.0, 0.05])
    parser.add_argument("--offsets", type=float, nargs="*", default=[],
                        help="also τ_i = max over calibration + o, for each o")
    parser.add_argument("--rho", type=float, default=0.7)
    parser.add_argument("--detail", default=None, help="a row name: also count its other-subject fires per type pair")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model, tokenizer, data = study_setup()
    b100, c9, types, regimes, others = data["b100"], data["c9"], data["types"], data["regimes"], data["others"]
    held_neutral, train_neg, calib, texts = data["held"], data["train_neg"], data["calib"], data["texts"]
    modules = [model.model.layers[layer].mlp.down_proj for layer in args.layers]
    seqs = [render(tokenizer, make_chat(t)) for t in texts]
    feats = tail_inputs(model, modules, seqs, pad_id(tokenizer), N_TAIL, desc="features")
    row = {t: i for i, t in enumerate(texts)}
    result, detail = {}, {}
    for layer, f in zip(args.layers, feats):
        for regime, pairs in regimes.items():
            labels_of = sorted({t for _, t in pairs})
            x = torch.cat([f[[row[q] for q, _ in pairs]], f[[row[q] for q in train_neg]]]).reshape(-1, f.shape[-1])
            y = torch.tensor([labels_of.index(t) for _, t in pairs] + [-1] * len(train_neg)).repeat_interleave(N_TAIL)
            router = train_router(x, y, layer, progress=False)

            def z(strings: list[str], router=router, f=f) -> torch.Tensor:
                return router.project(f[[row[s] for s in strings]])  # [n, N_TAIL, r]

            by_type = {t: [q for q, u in pairs if u == t] for t in labels_of}
            anchors = torch.stack([torch.nn.functional.normalize(z(qs).mean((0, 1)), dim=0)
                                   for qs in by_type.values()])
            z_cal = z(calib)
            for i in range(100):
                keys = z(variant_questions(c9[i])).reshape(-1, anchors.shape[1])
                proto = torch.nn.functional.normalize(keys.mean(0), dim=0)
                rivals = anchors[(anchors @ proto) < args.rho]

                def score(zq: torch.Tensor, keys=keys, rivals=rivals) -> tuple[torch.Tensor, torch.Tensor]:
                    s = (zq @ keys.T).amax(-1)  # [n, N_TAIL]
                    r = (zq @ rivals.T).amax(-1) if len(rivals) else torch.full_like(s, -2.0)
                    return s, r

                s_cal, _ = score(z_cal)
                probes = {m: [b100[i][fld]] for m, fld in METRICS.items()}
                probes |= {"neutral_ff": held_neutral, "other_ff": others[i]}
                scored = {m: score(z(qs)) for m, qs in probes.items()}
                rules = [(f"q={q}", float(torch.quantile(s_cal.amax(-1), 1 - q))) for q in args.quantiles]
                rules += [(f"max+{o}", float(s_cal.max()) + o) for o in args.offsets]
                for rule, tau in rules:
                    for gate, margins in (("threshold", [None]), ("competitive", args.margins)):
                        for m_ in margins:
                            name = f"L{layer} {regime} {rule} {gate}" + ("" if m_ is None else f" m={m_}")
                            held = "held-out types" if types[i] in HELD_OUT_TYPES + ("entertainment preference",) \
                                else "seen types"
                            cell = result.setdefault(name, {}).setdefault(held, {})
                            for m, (s, r) in scored.items():
                                fire = s >= tau if m_ is None else (s >= tau) & (s > r + m_)
                                cell.setdefault(m, []).append(float(fire.any(-1).float().mean()))
                                if m == "other_ff" and name == args.detail:
                                    for q, hit in zip(others[i], fire.any(-1).tolist()):
                                        pair = f"{types[i]} <- {q}"
                                        detail[pair] = detail.get(pair, 0) + int(hit)
    table = {name: {held: {m: round(sum(v) / len(v), 3) for m, v in cell.items()} for held, cell in groups.items()}
             for name, groups in result.items()}
    for name, groups in table.items():
        print(name, json.dumps(groups))
    if args.detail:
        print(json.dumps(dict(sorted(detail.items(), key=lambda kv: -kv[1])), indent=0))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "router_gate.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
