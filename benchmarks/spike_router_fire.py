"""Router-only diagnostic (issue 10 spike): how often a preference's topic gate fires, without editing.

    PYTHONPATH=.:benchmarks python benchmarks/spike_router_fire.py --layer 12

For every balanced100 item: keys = router projections of its cluster9 variant questions at the generation
prompt (bare and under one random neutral history), τ as in the spike (quantile of calibration neutrals and
other types' variant questions). Fire = any generation-prompt token of the chat scores ≥ τ. Reports the fire
rate on the item's evaluated questions (held out of keys) and the false-fire rate on held-out neutral prompts
and on other types' evaluated questions, for several false-fire quantiles.
"""

from __future__ import annotations

import argparse
import json
import random

import torch
from spike_topic_data import (
    EVAL_FIELDS,
    N_TAIL,
    history_pairs,
    load_splits,
    neutral_split,
    random_history,
    variant_questions,
)
from spike_topic_eval import METRICS

from peft_persedit.cache import cache_dir
from peft_persedit.editing.chat import pad_id
from peft_persedit.editing.scope import ScopeRouter, tail_inputs
from peft_persedit.editing.selftext import model_fingerprint
from peft_persedit.evaluation.distractors import history, model_distractors
from peft_persedit.evaluation.generation import make_chat, render


def project(model, tokenizer, module, router, chats) -> torch.Tensor:
    seqs = [render(tokenizer, c) for c in chats]
    return router.project(tail_inputs(model, module, seqs, pad_id(tokenizer), N_TAIL))  # [N, 4, r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--router", default="r64_s400")
    parser.add_argument("--quantiles", type=float, nargs="*", default=[0.0, 0.005, 0.02, 0.05])
    args = parser.parse_args()
    torch.set_num_threads(1)
    from peft_persedit import load_default_model

    model, tokenizer = load_default_model()
    module = model.model.layers[args.layer].mlp.down_proj
    path = cache_dir("scope", model_fingerprint(model)) / f"router_L{args.layer}_{args.router}.pt"
    router = ScopeRouter.from_state(torch.load(path))
    b100, c9, _ = load_splits()
    held_out, router_neutral, calib = neutral_split()
    pairs = history_pairs(model, tokenizer, router_neutral)
    rng = random.Random(1)
    key_chats, owner = [], []
    for i in range(len(b100)):
        for q in variant_questions(c9[i]):
            key_chats += [make_chat(q), make_chat(q, history=random_history(pairs, rng, 1, 3))]
            owner += [i, i]
    keys = project(model, tokenizer, module, router, key_chats).reshape(len(key_chats) * N_TAIL, -1)
    key_owner = torch.tensor(owner).repeat_interleave(N_TAIL)
    distract = history(model_distractors(model, tokenizer), 10)
    evals = {m: [make_chat(x[f]) for x in b100] for m, f in METRICS.items()}
    evals["multiturn@10"] = [make_chat(x["question"], history=distract) for x in b100]
    z_eval = {m: project(model, tokenizer, module, router, c) for m, c in evals.items()}
    z_cal = project(model, tokenizer, module, router, [make_chat(p) for p in calib]
                    + [make_chat(p, history=random_history(pairs, rng, 1, 3)) for p in calib])
    z_held = project(model, tokenizer, module, router, [make_chat(p) for p in held_out])
    types = [x["attribute_type"] for x in b100]
    z_var_other = keys.reshape(len(key_chats), N_TAIL, -1)[::2]  # bare variant questions, one row per variant
    var_type = [types[o] for o in owner[::2]]
    result = {}
    for q in args.quantiles:
        rates: dict[str, list[float]] = {m: [] for m in list(evals) + ["neutral_heldout", "other_types_eval"]}
        for i in range(len(b100)):
            k = keys[key_owner == i]
            other = [j for j, t in enumerate(var_type) if t != types[i]]
            neg = torch.cat([z_cal.reshape(-1, k.shape[1]), z_var_other[other].reshape(-1, k.shape[1])])
            scores = (neg @ k.T).amax(1)
            tau = float(torch.quantile(scores, 1 - q)) if q > 0 else float(scores.max())
            for m, z in z_eval.items():
                rates[m].append(float((z[i] @ k.T).amax() >= tau))
            rates["neutral_heldout"].append(float(((z_held @ k.T).amax(-1).amax(-1) >= tau).float().mean()))
            others = [j for j in range(len(b100)) if types[j] != types[i]]
            fired = [(z_eval[m][others] @ k.T).amax(-1).amax(-1) >= tau for m in METRICS if m != "efficacy"]
            rates["other_types_eval"].append(float(torch.cat(fired).float().mean()))
        result[str(q)] = {m: round(sum(v) / len(v), 3) for m, v in rates.items()}
        print(q, json.dumps(result[str(q)]))
    out = cache_dir("scope") / f"fire_L{args.layer}.json"
    out.write_text(json.dumps(result, indent=1))
    _ = EVAL_FIELDS


if __name__ == "__main__":
    main()
