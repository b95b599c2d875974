"""Helpers for the tests: capture an edit layer's inputs, add a cluster keyed on a token."""

from __future__ import annotations

import torch
from peft import PeftModel

from peft_persedit import PersEditLinear


def edit_layers(pm: PeftModel) -> list[PersEditLinear]:
    return list(pm.base_model.edit_layers().values())


def layer_input(pm: PeftModel, layer: PersEditLinear, ids: torch.Tensor) -> torch.Tensor:
    """The input x of ``layer`` for ``ids`` ([B, S, d_in])."""
    seen = {}
    handle = layer.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach().clone()))
    with torch.no_grad():
        pm(input_ids=ids)
    handle.remove()
    return seen["x"]


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
