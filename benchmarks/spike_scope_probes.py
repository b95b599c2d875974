"""Scope probes (issue 10): where do paraphrased and implicit questions fail, and does a zero-shot scope separate them?

    python benchmarks/spike_scope_probes.py gate [--every 5] [--config '{"key_token": "prompt_last"}']
    python benchmarks/spike_scope_probes.py likelihood [--every 5] [--label subject --template topic | --both]

``gate``: edits every ``--every``-th balanced100 item as its own user (the given config fields over the defaults),
then, per question kind, counts the users whose gate fires on some token of the question (max over tokens of
s − τ ≥ 0) and whose greedy answer contains the target: the gate or the value, which one fails; and how often
the gates fire on the 40 first neutral prompts (held out of gate calibration; those the locality metric uses).

``likelihood``: no edit. The score of question q for preference i is ℓ_i(q) = mean log P(label_i | chat(T(q))) over
the label's tokens, the base model's own judgement: label = the target (how well it answers q; T = q itself) or the
subject (``--template topic``: T asks which topic of the user's life q is about). It fires when ℓ_i(q) ≥ the
quantile Q of ℓ_i over 40 calibration neutral prompts, plus a margin m. Reports the fire rate on the items' own
questions and the false-fire rate on the 40 first neutral prompts and on the other items' literal questions.
``--both`` fires where the target scope and the topic scope both fire.
"""

from __future__ import annotations

import argparse
import json

import torch
from peft import get_peft_model

from peft_persedit import PersonalizationEditConfig, load_default_model
from peft_persedit.data_paths import dataset_path
from peft_persedit.editing import PersonalizationEditor
from peft_persedit.editing.chat import chat_text, encode, pad_batch, pad_id
from peft_persedit.editing.keys import layer_inputs
from peft_persedit.editing.selftext import HELD_OUT_PROMPTS
from peft_persedit.editing.verify import answer_questions, target_hit
from peft_persedit.kernels import cluster_scores
from peft_persedit.layer import PersEditLayer
from peft_persedit.preferences import Preference, load_preferences
from peft_persedit.prompts import load_prompt_set

TEMPLATES = {"answer": "{question}",
             "topic": 'Question: "{question}"\nWhich part of my life is this question about? Answer with one or two '
                      'words.'}
KINDS = {"question": "question", "paraphrase": "paraphrased_question", "implicit": "implicit_question",
         "product": "product_question"}


def gate_probe(prefs: list[Preference], fields: dict) -> None:
    """Per question kind: users whose gate fires somewhere in the question, whose answer hits, and both."""
    model, tokenizer = load_default_model()
    pm = get_peft_model(model, PersonalizationEditConfig(**fields), adapter_name="template").eval()
    users = {f"u{i}": [p] for i, p in enumerate(prefs)}
    PersonalizationEditor(pm, tokenizer, adapter_name="template", progress=False).edit_users(users, verify=False)
    layer = next(m for m in pm.modules() if isinstance(m, PersEditLayer))

    def fires(user: str, x: torch.Tensor) -> bool:  # the gate fires on some token of the question
        bank = layer.packed_bank([user])
        return float((cluster_scores(x, bank, torch.zeros(len(x), dtype=torch.long))[:, 0] - bank.tau[0]).max()) >= 0

    def token_inputs(questions: list[str]) -> tuple[torch.Tensor, ...]:
        sequences = [encode(tokenizer, chat_text(tokenizer, q)) for q in questions]
        return layer_inputs(pm, [layer], sequences, pad_id(tokenizer))[0].split([len(s) for s in sequences])

    neutral = token_inputs(load_prompt_set("neutral_prompts")[:40])  # the first 50 are never calibrated on
    rate = sum(fires(user, x) for user in users for x in neutral) / (len(users) * len(neutral))
    print(f"gate fires on {rate:.3f} of 40 neutral prompts (held out of calibration) per user")
    for kind, attr in KINDS.items():
        questions = [getattr(p, attr) for p in prefs]
        fired = [fires(user, x) for user, x in zip(users, token_inputs(questions))]
        hits = [target_hit(a, p.target) for a, p in zip(answer_questions(pm, tokenizer, questions, list(users)), prefs)]
        print(f"{kind:>10}: gate fires {sum(fired)}/{len(prefs)}, target said {sum(hits)}, "
              f"both {sum(f and h for f, h in zip(fired, hits))}")


@torch.no_grad()
def target_likelihood(model, tokenizer, pairs: list[tuple[str, str]], template: str = "{question}",
                      batch_size: int = 64) -> torch.Tensor:
    """Mean log P(target | chat(template(question))) over the target's tokens, per (question, target) pair."""
    out = []
    for start in range(0, len(pairs), batch_size):
        rows, spans = [], []
        for question, target in pairs[start:start + batch_size]:
            prompt = encode(tokenizer, chat_text(tokenizer, template.format(question=question)))
            answer = encode(tokenizer, target)
            rows.append(prompt + answer)
            spans.append((len(prompt), len(answer)))
        ids, mask = pad_batch(rows, pad_id(tokenizer))
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for j, (begin, count) in enumerate(spans):
            labels = ids[j, begin:begin + count]
            out.append(float(logp[j, begin - 1:begin - 1 + count].gather(-1, labels[:, None]).mean()))
    return torch.tensor(out)


def scope_fires(model, tokenizer, prefs: list[Preference], label: str, template: str):
    """The likelihood scope of ``label``/``template``: a function (Q, m) → per question set, where it fires (the
    items' own questions by kind, the held-out neutral prompts [P, 40], the other items' literal questions)."""
    neutral = load_prompt_set("neutral_prompts")
    calibration, held_out = neutral[HELD_OUT_PROMPTS:][:40], neutral[:40]
    labels = [getattr(p, label) for p in prefs]

    def scores(pairs: list[tuple[str, str]]) -> torch.Tensor:
        return target_likelihood(model, tokenizer, pairs, TEMPLATES[template])

    base = torch.stack([scores([(q, text) for q in calibration]) for text in labels])  # [P, 40]
    own = {kind: scores([(getattr(p, attr), text) for p, text in zip(prefs, labels)]) for kind, attr in KINDS.items()}
    neutral_scores = torch.stack([scores([(q, text) for q in held_out]) for text in labels])
    other = [scores([(o.question, text) for o in prefs if o.subject != p.subject]) for p, text in zip(prefs, labels)]

    def fires(quantile: float, margin: float) -> dict[str, torch.Tensor]:
        tau = torch.quantile(base, quantile, dim=1) + margin
        out = {kind: s >= tau for kind, s in own.items()}
        out["neutral_false_fire"] = neutral_scores >= tau[:, None]
        out["other_false_fire"] = torch.cat([o >= t for o, t in zip(other, tau)])
        return out

    return fires


def likelihood_probe(prefs: list[Preference], label: str, template: str, both: bool) -> None:
    """Fire and false-fire rates of the zero-shot likelihood scope at several thresholds (``both``: where the
    target scope and the topic scope fire together, each at the same Q and m)."""
    model, tokenizer = load_default_model()
    model.eval()
    scopes = [("target", "answer"), ("subject", "topic")] if both else [(label, template)]
    fires = [scope_fires(model, tokenizer, prefs, *scope) for scope in scopes]
    for quantile in (0.95, 0.99, 1.0):
        for margin in (0.0, 0.5, 1.0):
            parts = [f(quantile, margin) for f in fires]
            row = {name: round(float(torch.stack([p[name] for p in parts]).all(0).float().mean()),
                               3 if name.endswith("fire") else 2) for name in parts[0]}
            print(f"Q={quantile} m={margin}: {json.dumps(row)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=("gate", "likelihood"))
    parser.add_argument("--every", type=int, default=5, help="every k-th balanced100 item (5: 20 items, 2 per type)")
    parser.add_argument("--label", choices=("target", "subject"), default="target", help="likelihood probe")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="answer", help="likelihood probe")
    parser.add_argument("--both", action="store_true", help="likelihood probe: target AND topic scope")
    parser.add_argument("--config", type=json.loads, default={}, help="config fields over the defaults (gate probe)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    prefs = load_preferences(dataset_path("upqa_balanced100"))[:: args.every]
    if args.probe == "gate":
        gate_probe(prefs, args.config)
    else:
        likelihood_probe(prefs, args.label, args.template, args.both)


if __name__ == "__main__":
    main()
