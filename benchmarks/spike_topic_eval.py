"""Evaluation for the topic-scope spike: greedy answers per user through a :class:`TopicBank`, exact target
substring, gate-fire diagnostics at the generation prompt, locality as unchanged greedy output."""

from __future__ import annotations

import random
import time
from collections import defaultdict

import torch
from spike_topic_data import EVAL_FIELDS, N_TAIL, neutral_split

from peft_persedit.editing.chat import pad_batch, pad_id
from peft_persedit.editing.scope import tail_inputs
from peft_persedit.editing.topic import TopicBank
from peft_persedit.evaluation.distractors import history
from peft_persedit.evaluation.generation import eos_ids, make_chat, render

METRICS = {"efficacy": "question", "generalization": "question_paraphrased", "implicit": "implicit_question",
           "product": "product_recommendation_question"}


@torch.no_grad()
def generate(model, tokenizer, bank: TopicBank, seqs: list[list[int]], users: list[int], enabled: bool = True,
             max_new_tokens: int = 24, batch_size: int = 32) -> list[list[int]]:
    """Greedy continuations (cut after the first eos), row i through user ``users[i]``'s clusters."""
    pad, stop = pad_id(tokenizer), eos_ids(model, tokenizer)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: dict[int, list[int]] = {}
    bank.enabled = enabled
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            ids, mask = pad_batch([seqs[i] for i in batch], pad, left=True)
            bank.row_user = torch.tensor([users[i] for i in batch])
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad)
            for i, row in zip(batch, gen[:, ids.shape[1]:].tolist()):
                out[i] = row[: next((k + 1 for k, t in enumerate(row) if t in stop), len(row))]
    finally:
        bank.row_user, bank.enabled = None, True
    return [out[i] for i in range(len(seqs))]


@torch.no_grad()
def unchanged(model, tokenizer, bank: TopicBank, seqs: list[list[int]], conts: list[list[int]], users: list[int],
              batch_size: int = 32) -> list[bool]:
    """Whether greedy decoding of seqs[i] through user i's clusters reproduces conts[i] (teacher-forced)."""
    pad = pad_id(tokenizer)
    result = []
    for start in range(0, len(seqs), batch_size):
        rows = range(start, min(start + batch_size, len(seqs)))
        ids, mask = pad_batch([seqs[i] + conts[i] for i in rows], pad, left=True)
        bank.row_user = torch.tensor([users[i] for i in rows])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        for j, i in enumerate(rows):
            n = len(conts[i])
            result.append(logits[j, -n - 1:-1].argmax(-1).tolist() == conts[i])
    bank.row_user = None
    return result


def fired(model, module, bank: TopicBank, seqs: list[list[int]], users: list[int], clusters: list[int],
          pad: int) -> list[bool]:
    """Whether cluster ``clusters[i]`` fires on any generation-prompt token of ``seqs[i]``."""
    x = tail_inputs(model, module, seqs, pad, N_TAIL)
    g = bank.gates(x)  # [N, 4, C] (no user mask: row_user is None)
    return [bool(g[i, :, c].any()) for i, c in enumerate(clusters)]


def evaluate_users(model, tokenizer, bank: TopicBank, module, b100: list[dict], users: dict[str, list[int]],
                   distractors, args) -> dict:
    """Every metric for every edited preference plus locality per user; fractions and per-row records."""
    start = time.perf_counter()
    pad = pad_id(tokenizer)
    rows, seqs, row_users, clusters = [], [], [], []
    cluster = 0
    for u_idx, (user, items) in enumerate(users.items()):
        for i in items:
            chats = {m: make_chat(b100[i][f]) for m, f in METRICS.items()}
            chats["multiturn@10"] = make_chat(b100[i]["question"], history=history(distractors, 10))
            for metric, chat in chats.items():
                rows.append({"user": user, "item": i, "metric": metric, "target": b100[i]["target"],
                             "question": chat[-1][1]})
                seqs.append(render(tokenizer, chat))
                row_users.append(u_idx)
                clusters.append(cluster)
            cluster += 1
    answers = generate(model, tokenizer, bank, seqs, row_users)
    fire = fired(model, module, bank, seqs, row_users, clusters, pad)
    for row, ans, f in zip(rows, answers, fire):
        row["answer"] = tokenizer.decode(ans, skip_special_tokens=True).strip()
        row["hit"] = row["target"].lower() in row["answer"].lower()
        row["fired"] = f
    summary: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        group = "grouped" if row["user"].startswith("g") else "single"
        summary[group][row["metric"]].append(row["hit"])
        summary[group][row["metric"] + "_fired"].append(row["fired"])
    out = {g: {m: round(sum(v) / len(v), 3) for m, v in d.items()} for g, d in summary.items()}
    out["locality"] = locality(model, tokenizer, bank, b100, users)
    out["eval_s"] = round(time.perf_counter() - start, 1)
    out["rows"] = rows
    return out


def locality(model, tokenizer, bank: TopicBank, b100: list[dict], users: dict[str, list[int]]) -> dict:
    """Per user, share of held-out neutral prompts / other types' questions whose greedy output is unchanged."""
    held_out, _, _ = neutral_split()
    sets: dict[str, list[tuple[int, str]]] = {"neutral": [], "other": [], "other_strict": []}
    for u_idx, items in enumerate(users.values()):
        mine = {b100[i]["attribute_type"] for i in items}
        others = [x for x in b100 if x["attribute_type"] not in mine]
        sets["neutral"] += [(u_idx, p) for p in held_out]
        sets["other"] += [(u_idx, q) for q in dict.fromkeys(x["question"] for x in others)]
        strict = list(dict.fromkeys(x[f] for x in others for f in EVAL_FIELDS))
        sets["other_strict"] += [(u_idx, q) for q in random.Random(u_idx).sample(strict, min(40, len(strict)))]
    result = {}
    for name, pairs in sets.items():
        if not pairs:
            continue
        seqs = [render(tokenizer, make_chat(q)) for _, q in pairs]
        uniq = list(dict.fromkeys(map(tuple, seqs)))
        base = dict(zip(uniq, generate(model, tokenizer, bank, [list(s) for s in uniq], [0] * len(uniq), False)))
        same = unchanged(model, tokenizer, bank, seqs, [base[tuple(s)] for s in seqs], [u for u, _ in pairs])
        per_user: dict[int, list[bool]] = defaultdict(list)
        for (u, _), ok in zip(pairs, same):
            per_user[u].append(ok)
        result[name] = round(sum(sum(v) / len(v) for v in per_user.values()) / len(per_user), 3)
        result[name + "_n"] = len(pairs)
    return result
