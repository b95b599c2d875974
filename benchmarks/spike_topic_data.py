"""Data for the topic-scope spike: UPQA splits (no evaluated question leaks), chat histories, router features.

Router training set: UPQA dev minus every item whose question text is a balanced100 question (those items share
balanced100's paraphrase/implicit/product questions) and minus any item one of whose questions is an evaluated
balanced100 question. balanced100's 10 attribute types are then (except 'family') held out of router training.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from peft_persedit.editing.scope import tail_inputs
from peft_persedit.editing.selftext import HELD_OUT_PROMPTS, _cached_json
from peft_persedit.evaluation.distractors import first_sentence
from peft_persedit.evaluation.generation import generate_chats, make_chat, render
from peft_persedit.prompts import load_prompt_set

DATA = Path(__file__).resolve().parents[1] / "data" / "upqa"
EVAL_FIELDS = ("question_paraphrased", "implicit_question", "product_recommendation_question")
N_TAIL = 4  # "<|im_start|>", "ass", "istant", "\n": the generation prompt of SmolLM2's template


def load_splits() -> tuple[list[dict], list[dict], list[dict]]:
    """(balanced100, its cluster9 entries, router training items from dev)."""
    b100 = json.loads((DATA / "upqa_balanced100.json").read_text())
    c9 = json.loads((DATA / "upqa_balanced100_cluster9.json").read_text())
    dev = json.loads((DATA / "upqa_dev.json").read_text())
    b_questions = {x["question"] for x in b100}
    evaluated = {x[f] for x in b100 for f in EVAL_FIELDS} | b_questions
    train = [x for x in dev if x["question"] not in b_questions
             and not any(x[f] in evaluated for f in EVAL_FIELDS)]
    return b100, c9, train


def variant_questions(c9_item: dict) -> list[str]:
    """The cluster9 questions allowed as keys (none equal to an evaluated question of the item)."""
    banned = {c9_item[f].strip().lower() for f in EVAL_FIELDS}
    return [q for q in c9_item["question"] if q.strip().lower() not in banned]


def neutral_split() -> tuple[list[str], list[str], list[str]]:
    """(held-out locality prompts, router-training neutrals, calibration neutrals)."""
    prompts = load_prompt_set("neutral_prompts")
    held_in = prompts[HELD_OUT_PROMPTS:]
    half = len(held_in) // 2
    return prompts[:HELD_OUT_PROMPTS], held_in[:half], held_in[half:]


def history_pairs(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[tuple[str, str]]:
    """(question, first-sentence greedy answer) of the base model to held-in neutral prompts, cached per model."""

    def build() -> list[str]:
        answers = generate_chats(model, tokenizer, [make_chat(p) for p in prompts], max_new_tokens=32)
        return [first_sentence(a.text) or "I'm not sure." for a in answers]

    answers = _cached_json(f"spike_history_{len(prompts)}", model, build)
    return list(zip(prompts, answers))


def random_history(pairs: list[tuple[str, str]], rng: random.Random, low: int = 1, high: int = 6) -> tuple:
    """A random chat history of ``low``..``high`` (user, assistant) turns."""
    turns = rng.sample(pairs, rng.randint(low, min(high, len(pairs))))
    return tuple(m for q, a in turns for m in (("user", q), ("assistant", a)))


def router_features(model: nn.Module, tokenizer: PreTrainedTokenizerBase, modules: list[nn.Module],
                    train: list[dict], neutrals: list[str], pairs: list[tuple[str, str]], pad: int,
                    seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Generation-prompt features [N·4, d] per module and labels (attribute type id; −1 = neutral)."""
    rng = random.Random(seed)
    types = sorted({x["attribute_type"] for x in train})
    chats, labels = [], []
    for x in train:
        label = types.index(x["attribute_type"])
        for f in ("question",) + EVAL_FIELDS:
            chats.append(make_chat(x[f]))
            labels.append(label)
        for f in ("question", "implicit_question"):
            chats.append(make_chat(x[f], history=random_history(pairs, rng)))
            labels.append(label)
    for p in neutrals:
        for hist in ((), random_history(pairs, rng), random_history(pairs, rng)):
            chats.append(make_chat(p, history=hist))
            labels.append(-1)
    seqs = [render(tokenizer, c) for c in chats]
    feats = tail_inputs(model, modules, seqs, pad, N_TAIL, desc="router features")
    lab = torch.tensor(labels).repeat_interleave(N_TAIL)
    return [f.reshape(-1, f.shape[-1]) for f in feats], lab
