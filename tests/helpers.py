"""Helpers for the tests: capture an edit layer's inputs and deltas, add clusters keyed on tokens or at random."""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model
from tiny_models import make_tiny_model

from peft_persedit import PersEditLinear, PersonalizationEditConfig
from peft_persedit.preferences import Preference

#: two rows of 7 token ids (tiny models have a vocabulary of 256)
IDS = torch.tensor([[5, 17, 99, 42, 7, 81, 23], [9, 44, 3, 120, 66, 12, 200]])


def edit_layers(pm: PeftModel) -> list[PersEditLinear]:
    return list(pm.base_model.edit_layers().values())


def layer_input(pm: PeftModel, layer: PersEditLinear, ids: torch.Tensor) -> torch.Tensor:
    """The input x of ``layer`` for ``ids`` ([B, S, d_in])."""
    return layer_io(pm, layer, ids)[0]


def layer_io(pm: PeftModel, layer: PersEditLinear, ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, delta)`` of ``layer`` for ``ids``: its input and what the edits add to the base layer's output."""
    seen = {}
    hooks = [
        layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), out=out.detach())),
        layer.base_layer.register_forward_hook(lambda m, args, out: seen.update(base=out.detach())),
    ]
    try:
        with torch.no_grad():
            pm(input_ids=ids, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["x"], seen["out"] - seen["base"]


def add_random_clusters(layer: PersEditLinear, adapter: str, n: int, rank: int = 2, keys_per: int = 2,
                        tau: float = 0.2, scale: float = 1.0, seed: int = 0) -> None:
    """``n`` clusters with random keys, ranks and deltas (for save/load and batching tests)."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = layer.in_features, layer.out_features
    layer.add_clusters(
        adapter, keys=torch.randn(n * keys_per, d_in, generator=g),
        key_cluster=torch.arange(n).repeat_interleave(keys_per), tau=torch.full((n,), tau),
        A=torch.randn(n * rank, d_in, generator=g) * scale, B=torch.randn(d_out, n * rank, generator=g) * scale,
        rank_cluster=torch.arange(n).repeat_interleave(rank), shift=torch.randn(n, d_out, generator=g) * 0.1 * scale)


def add_keyed_cluster(layer: PersEditLinear, adapter: str, key: torch.Tensor, tau: float, rank: int = 1,
                      seed: int = 0) -> None:
    """One cluster with the single key ``key``, threshold ``tau`` and a random rank-``rank`` delta."""
    g = torch.Generator().manual_seed(seed)
    layer.add_clusters(
        adapter, keys=key.detach().float()[None], key_cluster=torch.tensor([0]), tau=torch.tensor([tau]),
        A=torch.randn(rank, layer.in_features, generator=g), B=torch.randn(layer.out_features, rank, generator=g),
        rank_cluster=torch.zeros(rank, dtype=torch.long))


def threshold_between(cos: torch.Tensor, min_above: int = 2, gap: float = 1e-3) -> float:
    """A τ with at least ``min_above`` of ``cos`` above it, the rest below, and no value within ``gap``/2 of it."""
    values = cos.flatten().float().sort(descending=True).values
    for i in range(min_above - 1, values.numel() - 1):
        if values[i] - values[i + 1] > gap:
            return float((values[i] + values[i + 1]) / 2)
    raise AssertionError(f"no gap in the cosines {values.tolist()}")


#: preferences the editing tests edit into tiny models
PREFS = [
    Preference("hobby", "What's my hobby?", "Dancing", synonyms=("pastime",), questions=("What's my pastime?",)),
    Preference("pet", "What's my pet?", "A turtle"),
    Preference("city", "Which city do I live in?", "Oslo"),
]


def tiny_pm(**config) -> PeftModel:
    """A tiny llama with a PERSEDIT adapter (layer 1, no synonyms, one context, 3 value steps, C = I) in eval mode."""
    cfg = dict(layers_to_transform=[1], synonyms=0, contexts=1, value_steps=3, mom2="none")
    cfg.update(config)
    return get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(**cfg)).eval()


def multi_prompt_requests(tokenizer, prompts_per_pref: int = 4) -> list:
    """One request per PREFS entry with its question in ``prompts_per_pref`` context variants and a KL prompt."""
    from peft_persedit.editing.chat import chat_text, encode, subject_token_index
    from peft_persedit.editing.value_chunks import ValueRequest

    requests = []
    for pref in PREFS:
        prompts = []
        for context in ["", "Quick one.", "Hello!", "Be brief.", "Thanks."][:prompts_per_pref]:
            text = chat_text(tokenizer, f"{context} {pref.question}".strip())
            prompts.append((encode(tokenizer, text), subject_token_index(tokenizer, text, pref.question, pref.subject)))
        requests.append(ValueRequest(prompts, encode(tokenizer, pref.target), (encode(tokenizer, "pet is a"), 0)))
    return requests
