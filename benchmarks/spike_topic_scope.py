"""Spike (issue 10): topic-scoped edits gated in a learned scope projection, measured on UPQA balanced100.

    PYTHONPATH=. python benchmarks/spike_topic_scope.py --layer 12 --out benchmarks/results/spike_topic/L12.json

1. router: P (64 × 1536) at layer L's down_proj input, trained on UPQA dev minus balanced100 (types as labels,
   half the held-in neutral prompts as negatives), at the generation-prompt tokens, cached per model/layer;
2. edits: 2 users × 10 preferences + ``--singles`` single users from balanced100; per preference, keys = z of
   its cluster9 questions (minus any equal to an evaluated question) bare and under random neutral chat
   histories; δ (one shift) optimized at the generation prompt across those variants; τ from calibration
   neutrals and other types' cluster9 questions;
3. evaluation: greedy, chat template, exact target substring; locality = greedy output unchanged.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from spike_topic_data import (
    N_TAIL,
    history_pairs,
    load_splits,
    neutral_split,
    random_history,
    router_features,
    variant_questions,
)
from spike_topic_eval import evaluate_users

from peft_persedit.cache import cache_dir
from peft_persedit.editing.chat import encode, pad_id
from peft_persedit.editing.scope import ScopeRouter, tail_inputs, train_router
from peft_persedit.editing.selftext import model_fingerprint
from peft_persedit.editing.topic import TopicBank, calibrate_tau
from peft_persedit.editing.values import ValueRequest, optimize_values
from peft_persedit.evaluation.distractors import model_distractors
from peft_persedit.evaluation.generation import make_chat, render


def build_router(model, tokenizer, layer: int, args) -> tuple[ScopeRouter, float]:
    """Train (or load the cached) scope router; features of all ``--feature-layers`` come from one pass and are
    cached too. Returns the router and the build seconds (features + training)."""
    root = cache_dir("scope", model_fingerprint(model))
    tag = "_c9" if args.router_c9 else ""
    path = root / f"router_L{layer}_r{args.rank}_s{args.router_steps}{tag}.pt"
    if path.is_file() and not args.retrain:
        return ScopeRouter.from_state(torch.load(path)), 0.0
    start = time.perf_counter()
    feat_path = root / f"features_L{layer}.pt"
    if not feat_path.is_file():
        _, _, train = load_splits()
        _, router_neutral, _ = neutral_split()
        pairs = history_pairs(model, tokenizer, router_neutral)
        layers = sorted(set(args.feature_layers) | {layer})
        modules = [model.model.layers[li].mlp.down_proj for li in layers]
        feats, labels = router_features(model, tokenizer, modules, train, router_neutral, pairs, pad_id(tokenizer))
        for li, f in zip(layers, feats):
            torch.save({"features": f, "labels": labels}, root / f"features_L{li}.pt")
    data = torch.load(feat_path)
    feats, labels = data["features"], data["labels"]
    if args.router_c9:  # + balanced100's cluster9 variant questions (allowed keys), labelled by type: seen types
        extra, extra_labels = c9_features(model, tokenizer, layer, int(labels.max()) + 1)
        feats, labels = torch.cat([feats, extra]), torch.cat([labels, extra_labels])
    router = train_router(feats, labels, layer, rank=args.rank, steps=args.router_steps)
    torch.save(router.state(), path)
    return router, time.perf_counter() - start


def c9_features(model, tokenizer, layer: int, first_label: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generation-prompt features of balanced100's cluster9 variant questions (bare + one short history)."""
    b100, c9, _ = load_splits()
    _, router_neutral, _ = neutral_split()
    pairs = history_pairs(model, tokenizer, router_neutral)
    rng = random.Random(2)
    types = sorted({x["attribute_type"] for x in b100})
    chats, labels = [], []
    for x, c in zip(b100, c9):
        for q in variant_questions(c):
            chats += [make_chat(q), make_chat(q, history=random_history(pairs, rng, 1, 3))]
            labels += [first_label + types.index(x["attribute_type"])] * 2
    module = model.model.layers[layer].mlp.down_proj
    feats = tail_inputs(model, module, [render(tokenizer, c) for c in chats], pad_id(tokenizer), N_TAIL)
    return feats.reshape(-1, feats.shape[-1]), torch.tensor(labels).repeat_interleave(N_TAIL)


def pick_users(b100: list[dict], c9: list[dict], singles: int) -> dict[str, list[int]]:
    """2 users × 10 preferences (one item of each type each) + ``singles`` one-preference users."""
    by_type: dict[str, list[int]] = {}
    for i, x in enumerate(b100):
        by_type.setdefault(x["attribute_type"], []).append(i)
    users = {"gA": [v[0] for v in by_type.values()], "gB": [v[1] for v in by_type.values()]}
    rest = [i for depth in range(2, 10) for v in by_type.values() if depth < len(v) for i in [v[depth]]]
    for k, i in enumerate(rest[:singles]):
        users[f"s{k:02d}"] = [i]
    return users


def edit_chats(item_c9: dict, pairs, rng: random.Random, contexts: int) -> list[tuple]:
    """Key/value chats of one preference: its variant questions, bare and under ``contexts`` random histories."""
    out = []
    for q in variant_questions(item_c9):
        out.append(make_chat(q))
        out += [make_chat(q, history=random_history(pairs, rng, 1, 3)) for _ in range(contexts)]
    return out


def edit_all(model, pm, tokenizer, module, router, b100, c9, users, pairs, calib_neutral, args) -> tuple:
    """Keys, values and τ for every preference of every user; returns the bank and stage seconds."""
    rng = random.Random(1)
    pad = pad_id(tokenizer)
    times: dict[str, float] = {}
    start = time.perf_counter()
    jobs = [(u_idx, i) for u_idx, (u, items) in enumerate(users.items()) for i in items]
    chats = [edit_chats(c9[i], pairs, rng, args.contexts) for _, i in jobs]
    flat = [render(tokenizer, c) for cs in chats for c in cs]
    owner = torch.tensor([j for j, cs in enumerate(chats) for _ in cs])
    z = router.project(tail_inputs(model, module, flat, pad, N_TAIL, desc="keys"))  # [N, 4, r]
    times["keys"] = time.perf_counter() - start
    start = time.perf_counter()
    requests = []
    for j, (_, i) in enumerate(jobs):
        seqs = [flat[k] for k in (owner == j).nonzero().flatten().tolist()]
        prompts = [(s, len(s) - N_TAIL) for k, s in enumerate(seqs) if k % (args.contexts + 1) <= args.value_contexts]
        requests.append(ValueRequest(prompts, encode(tokenizer, b100[i]["target"])))
    values = optimize_values(pm, module, requests, pad, steps=args.value_steps, lr=args.value_lr, kl_weight=0.0,
                             clamp_norm_factor=args.clamp, span=N_TAIL)
    times["values"] = time.perf_counter() - start
    start = time.perf_counter()
    neg_seqs = [render(tokenizer, make_chat(p, history=h)) for p in calib_neutral
                for h in ((), random_history(pairs, rng), random_history(pairs, rng))]
    z_neutral = router.project(tail_inputs(model, module, neg_seqs, pad, N_TAIL)).reshape(-1, z.shape[-1])
    other = [(b100[k]["attribute_type"], q) for k in range(len(b100)) for q in variant_questions(c9[k])]
    z_other = router.project(tail_inputs(model, module, [render(tokenizer, make_chat(q)) for _, q in other], pad,
                                         N_TAIL))
    other_type = [t for t, _ in other]
    bank = TopicBank(router, module.out_features)
    taus = []
    for j, (u_idx, i) in enumerate(jobs):
        keys = z[owner == j]  # [m, 4, r]
        per_q = keys.reshape(len(keys), N_TAIL, -1)
        own = _leave_one_out(per_q)
        mine = b100[i]["attribute_type"]
        z_o = z_other[[t != mine for t in other_type]].reshape(-1, z.shape[-1])
        neg = torch.cat([z_neutral, z_o]) @ keys.reshape(-1, z.shape[-1]).T
        tau = calibrate_tau(own, neg.max(1).values, args.false_fire, args.tau_floor)
        bank.add(keys.reshape(-1, z.shape[-1]), tau, values.deltas[j], u_idx)
        taus.append(tau)
    times["gate"] = time.perf_counter() - start
    return bank, times, jobs, taus, values


def _leave_one_out(per_q: torch.Tensor) -> torch.Tensor:
    """Per chat and tail token, the best score against keys of the other chats of the cluster."""
    m = per_q.shape[0]
    sims = torch.einsum("atr,bsr->atbs", per_q, per_q).amax(-1)  # [m, 4, m]
    sims[torch.arange(m), :, torch.arange(m)] = float("-inf")
    return sims.amax(-1).flatten()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--router-steps", type=int, default=400)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--router-c9", action="store_true", help="also train the router on balanced100 cluster9")
    parser.add_argument("--build-only", action="store_true", help="build (and cache) the router, then stop")
    parser.add_argument("--feature-layers", type=int, nargs="*", default=[], help="more layers to cache features of")
    parser.add_argument("--singles", type=int, default=20)
    parser.add_argument("--contexts", type=int, default=1, help="random 1-3 turn histories per key question")
    parser.add_argument("--value-contexts", type=int, default=0, help="of those, how many also train δ")
    parser.add_argument("--value-steps", type=int, default=30)
    parser.add_argument("--value-lr", type=float, default=0.5)
    parser.add_argument("--clamp", type=float, default=4.0)
    parser.add_argument("--false-fire", type=float, default=0.005)
    parser.add_argument("--tau-floor", type=float, default=0.0)
    parser.add_argument("--out", default="benchmarks/results/spike_topic/result.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from peft import get_peft_model

    from peft_persedit import PersonalizationEditConfig, load_default_model

    model, tokenizer = load_default_model()
    model.eval()
    module = model.model.layers[args.layer].mlp.down_proj
    router, build_s = build_router(model, tokenizer, args.layer, args)
    print(f"router L{args.layer}: {build_s:.1f} s")
    if args.build_only:
        return
    b100, c9, _ = load_splits()
    _, router_neutral, calib_neutral = neutral_split()
    pairs = history_pairs(model, tokenizer, router_neutral)
    users = pick_users(b100, c9, args.singles)
    pm = get_peft_model(model, PersonalizationEditConfig()).eval()
    start = time.perf_counter()
    bank, times, jobs, taus, values = edit_all(model, pm, tokenizer, module, router, b100, c9, users, pairs,
                                                calib_neutral, args)
    edit_s = time.perf_counter() - start
    distractors = model_distractors(model, tokenizer)
    handle = bank.attach(module)
    try:
        result = evaluate_users(model, tokenizer, bank, module, b100, users, distractors, args)
    finally:
        handle.remove()
    result.update(args=vars(args), router_build_s=round(build_s, 1), edit_s=round(edit_s, 1),
                  edit_stage_s={k: round(v, 1) for k, v in times.items()}, n_prefs=len(jobs),
                  taus=[round(t, 3) for t in taus], value_nll=[round(float(v), 3) for v in values.final_nll])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "taus", "value_nll")}, indent=1))


if __name__ == "__main__":
    main()
