"""Text the model writes itself (offline): context prefixes for keys, a neutral corpus for C and the gates.

Both are cached per model fingerprint (a hash of the model's content, never of a path) in the user cache dir, so
they are generated once per model. For the embedded model they ship with the package
(``data/default_model_selftext.json``, made by ``scripts/build_default_selftext.py``) and are used when the
fingerprint matches, so the default path generates nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Callable
from importlib import resources

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from ..atomic import write_text_atomic
from ..cache import cache_dir, prune, read_cached, touch
from ..prompts import load_prompt_set
from .chat import chat_text, encode
from .decoding import generate_texts

CONTEXT_SEEDS = ("The", "Therefore", "Because", "I", "You", "Today", "In", "When")
SHIPPED_FILE = "default_model_selftext.json"
#: Values sampled (evenly spaced) from each weight tensor for the fingerprint.
FINGERPRINT_SAMPLES = 16384
#: Config entries that say where or how a model was loaded, not what it computes.
_VOLATILE_CONFIG = frozenset({"_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "dtype",
                              "torch_dtype", "use_cache", "output_attentions", "output_hidden_states", "return_dict"})
#: Most recently used models whose self-generated text stays cached.
KEEP_MODELS = 8


def _tensor_sample(param: torch.Tensor) -> bytes:
    """Shape, dtype and ≤ ``FINGERPRINT_SAMPLES`` evenly strided raw values of ``param`` (sliced on its device).

    The stride is made coprime to the last dimension, so the samples fall in every column, not one."""
    flat = param.detach().reshape(-1)
    step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
    while param.ndim and math.gcd(step, param.shape[-1]) > 1:
        step += 1
    raw = flat[::step][:FINGERPRINT_SAMPLES].contiguous().view(torch.uint8).cpu().numpy().tobytes()
    return f"{tuple(param.shape)}{param.dtype}".encode() + raw


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what decides how text is tokenized and formatted: vocabulary, special tokens, chat template."""
    vocab = tokenizer.get_vocab()
    special = [str(getattr(tokenizer, k, None)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")]
    digest = hashlib.sha256("\n".join(sorted(vocab, key=vocab.__getitem__)).encode())
    digest.update(json.dumps([len(vocab), special, getattr(tokenizer, "chat_template", None)], default=str).encode())
    return digest.hexdigest()


def architecture(config: PretrainedConfig) -> dict:
    """The config's architecture hyperparameters, written the same way by transformers 4 and 5: values equal to
    the base ``PretrainedConfig`` defaults (transformers 4's generation settings), ``None`` and where/how the model
    was loaded are left out, RoPE settings are flattened (``rope_parameters`` → ``rope_theta``/``rope_scaling``);
    ``tie_word_embeddings`` is left to the weights (tied weights are one parameter)."""
    raw = dict(config.to_dict())
    rope = raw.pop("rope_parameters", None) or {}
    raw.setdefault("rope_theta", rope.get("rope_theta"))
    if rope.get("rope_type", "default") != "default":
        raw["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    defaults = PretrainedConfig().to_dict()
    return {k: v for k, v in raw.items() if v is not None and k not in _VOLATILE_CONFIG | {"tie_word_embeddings"}
            and not (k in defaults and defaults[k] == v)}


def model_fingerprint(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """A short content hash identifying cached self-generated text and statistics: the config's
    :func:`architecture`, every base weight's shape, dtype and an evenly spaced sample of its values, and the
    tokenizer's :func:`tokenizer_digest`. Independent of paths and of peft wrapping (PERSEDIT banks are left
    out); costs a few ms on CPU. A change confined to a few weights between the sampled ones goes unnoticed."""
    config = getattr(model, "config", None)
    digest = hashlib.sha256(json.dumps(architecture(config) if config else {}, sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        if "persedit_" not in name:
            digest.update(_tensor_sample(param))
    if tokenizer is not None:
        digest.update(tokenizer_digest(tokenizer).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_new_tokens: int,
             sample: bool = False, seed: int = 0, batch_size: int = 16) -> list[str]:
    """Continuations of already formatted ``texts`` (left-padded batches; greedy unless ``sample``)."""
    torch.manual_seed(seed)
    options = {"do_sample": sample, "top_k": 5 if sample else None, "temperature": 1.0 if sample else None,
               "top_p": None}
    return generate_texts(model, tokenizer, [encode(tokenizer, t) for t in texts], max_new_tokens=max_new_tokens,
                          batch_size=batch_size, options=options)


@functools.lru_cache(maxsize=1)
def shipped_texts() -> dict:
    """The embedded model's self-generated text shipped with the package (``{}`` if absent)."""
    resource = resources.files("peft_persedit").joinpath("data", SHIPPED_FILE)
    return json.loads(resource.read_text()) if resource.is_file() else {}


def _cached_json(name: str, fingerprint: str, build: Callable[[], list[str]]) -> list[str]:
    """The user cache's ``selftext/<fingerprint>/<name>.json``, else the shipped text for this fingerprint, else
    ``build()`` (then cached, keeping the :data:`KEEP_MODELS` most recently used models)."""
    folder = cache_dir("selftext", fingerprint)
    touch(folder)
    path = folder / f"{name}.json"
    value = read_cached(path, lambda p: _string_list(json.loads(p.read_text())))
    if value is not None:
        return value
    shipped = shipped_texts()
    if shipped.get("fingerprint") == fingerprint and name in shipped.get("texts", {}):
        return list(shipped["texts"][name])
    value = build()
    write_text_atomic(path, json.dumps(value))
    prune(folder, "[0-9a-f]{16}", KEEP_MODELS)
    return value


def _string_list(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("not a list of strings")
    return value


def build_context_prefixes(model: nn.Module, tokenizer: PreTrainedTokenizerBase, n: int = 4,
                           length: int = 10) -> list[str]:
    """``n`` short sampled continuations of generic seeds, written by the model (uncached)."""
    seeds = list(CONTEXT_SEEDS[:n])
    texts = generate(model, tokenizer, seeds, max_new_tokens=length, sample=True)
    return [" ".join(f"{s}{t}".replace("\n", " ").split()) + "." for s, t in zip(seeds, texts)]


def context_prefixes(model: nn.Module, tokenizer: PreTrainedTokenizerBase, n: int = 4, length: int = 10) -> list[str]:
    """ROME's context templates: :func:`build_context_prefixes`, cached per model fingerprint."""
    return _cached_json(f"contexts_{n}_{length}", model_fingerprint(model, tokenizer),
                        lambda: build_context_prefixes(model, tokenizer, n, length))


#: The first 50 neutral prompts are held out for locality measurements; the corpus uses the rest.
HELD_OUT_PROMPTS = 50
FREE_TEXT_SEEDS = ("The", "In", "A", "It", "When", "Many", "There", "One", "This", "Some", "After", "Most")


def _corpus_prompts() -> list[str]:
    return load_prompt_set("neutral_prompts")[HELD_OUT_PROMPTS:]


def corpus_name(length: int = 48) -> str:
    """The cache (and shipped-text) name of :func:`neutral_corpus` with ``length`` new tokens per text."""
    return f"corpus_{len(_corpus_prompts())}_{length}"


def build_neutral_corpus(model: nn.Module, tokenizer: PreTrainedTokenizerBase, length: int = 48) -> list[str]:
    """The model's greedy answers to held-in neutral prompts (chat format) and sampled free-text continuations
    of generic seeds, ``length`` new tokens each (uncached)."""
    formatted = [chat_text(tokenizer, p) for p in _corpus_prompts()]
    answers = generate(model, tokenizer, formatted, max_new_tokens=length)
    free = generate(model, tokenizer, list(FREE_TEXT_SEEDS), max_new_tokens=length, sample=True, seed=1)
    return [f + a for f, a in zip(formatted, answers)] + [s + t for s, t in zip(FREE_TEXT_SEEDS, free)]


def neutral_corpus(model: nn.Module, tokenizer: PreTrainedTokenizerBase, length: int = 48,
                   fingerprint: str | None = None) -> list[str]:
    """Self-generated neutral text (:func:`build_neutral_corpus`), cached per model fingerprint (pass it when
    already known). Used for C = E[kkᵀ], μ and the gates' negatives."""
    fingerprint = fingerprint or model_fingerprint(model, tokenizer)
    return _cached_json(corpus_name(length), fingerprint, lambda: build_neutral_corpus(model, tokenizer, length))


def chat_turns(model: nn.Module, tokenizer: PreTrainedTokenizerBase, length: int = 48) -> list[tuple[str, str]]:
    """(prompt, the first sentence of the model's own answer) for the held-in neutral prompts of
    :func:`neutral_corpus`: earlier chat turns under which values are fit, so that an edit holds deep in a chat."""
    corpus = neutral_corpus(model, tokenizer, length)
    answers = (text[len(chat_text(tokenizer, p)):].strip() for p, text in zip(_corpus_prompts(), corpus))
    return [(p, re.split(r"(?<=[.!?])\s", a, maxsplit=1)[0]) for p, a in zip(_corpus_prompts(), answers)]
