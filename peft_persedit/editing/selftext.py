"""Text the model writes itself (offline): context prefixes for keys, a neutral corpus for C and the gates.

Both are cached per model fingerprint in the user cache dir, so they are generated once per model.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..cache import cache_dir
from ..prompts import load_prompt_set
from .chat import chat_text, encode, pad_batch, pad_id

CONTEXT_SEEDS = ("The", "Therefore", "Because", "I", "You", "Today", "In", "When")


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's config and a sample of its weights (identifies cached statistics)."""
    config = getattr(model, "config", None)
    digest = hashlib.sha1(json.dumps(config.to_dict() if config else {}, sort_keys=True, default=str).encode())
    params = [p for name, p in model.named_parameters() if "persedit_" not in name]
    for param in params[:: max(1, len(params) // 8)]:
        digest.update(param.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_new_tokens: int,
             sample: bool = False, seed: int = 0, batch_size: int = 16) -> list[str]:
    """Continuations of already formatted ``texts`` (left-padded batches; greedy unless ``sample``)."""
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    results: list[str] = []
    torch.manual_seed(seed)
    for start in range(0, len(texts), batch_size):
        ids, mask = pad_batch([encode(tokenizer, t) for t in texts[start:start + batch_size]], pad, left=True)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=sample, top_k=5 if sample else None, temperature=1.0 if sample else None,
                             top_p=None, pad_token_id=pad)
        results.extend(tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True))
    return results


def _cached_json(name: str, model: nn.Module, build) -> list[str]:
    path = cache_dir("selftext", model_fingerprint(model)) / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    value = build()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
    return value


def context_prefixes(model: nn.Module, tokenizer: PreTrainedTokenizerBase, n: int = 4, length: int = 10) -> list[str]:
    """ROME's context templates: ``n`` short sampled continuations of generic seeds, written by the model."""

    def build() -> list[str]:
        seeds = list(CONTEXT_SEEDS[:n])
        texts = generate(model, tokenizer, seeds, max_new_tokens=length, sample=True)
        return [" ".join(f"{s}{t}".replace("\n", " ").split()) + "." for s, t in zip(seeds, texts)]

    return _cached_json(f"contexts_{n}_{length}", model, build)


#: The first 50 neutral prompts are held out for locality measurements; the corpus uses the rest.
HELD_OUT_PROMPTS = 50
FREE_TEXT_SEEDS = ("The", "In", "A", "It", "When", "Many", "There", "One", "This", "Some", "After", "Most")


def neutral_corpus(model: nn.Module, tokenizer: PreTrainedTokenizerBase, length: int = 48) -> list[str]:
    """Self-generated neutral text: the model's greedy answers to held-in neutral prompts (chat format) and
    sampled free-text continuations of generic seeds. Used for C = E[kkᵀ], μ and the gates' negatives."""
    prompts = load_prompt_set("neutral_prompts")[HELD_OUT_PROMPTS:]

    def build() -> list[str]:
        formatted = [chat_text(tokenizer, p) for p in prompts]
        answers = generate(model, tokenizer, formatted, max_new_tokens=length)
        free = generate(model, tokenizer, list(FREE_TEXT_SEEDS), max_new_tokens=length, sample=True, seed=1)
        return [f + a for f, a in zip(formatted, answers)] + [s + t for s, t in zip(FREE_TEXT_SEEDS, free)]

    return _cached_json(f"corpus_{len(prompts)}_{length}", model, build)
