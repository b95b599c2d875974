"""Keys: the inputs x of edit modules (the ROME/MEMIT keys), read with an early exit after the deepest one, and
each preference's cluster of keys.

For preference i with cluster questions q_1..q_m (own question + synonym questions) and contexts c_0 = "" (the
bare inference format), c_1..c_n (self-generated prefixes), the key of (q, c) is the layer input at the
subject's last token of chat(c ⊕ q). The cluster keeps, per question, the bare key x(q, c_0) and the context
mean x̄(q) = 1/(n+1) Σ_j x(q, c_j), then k-means compresses the 2m keys to ≤ ``max_keys``. Keys of the own
question after h = 1..H earlier chat turns, x(q_1 | history_h), are added as they are (the subject key drifts
as a chat grows; these keep the gate firing there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from .chat import pad_batch
from .clusters import kmeans
from .prefix_cache import cache_argument, decoder_of, grouped_query_attention, repeated


class KeyPrompts(NamedTuple):
    """Token ids and key index of every key prompt, the preference each belongs to, and how many leading tokens
    each shares with the others (a cached prefix for :func:`layer_inputs`)."""

    prompts: list[tuple[list[int], int]]
    owner: torch.Tensor
    shared: list[int]


class _StopForward(Exception):
    pass


@contextmanager
def captured_inputs(modules: Sequence[nn.Module], select: Callable[[torch.Tensor], torch.Tensor]
                    ) -> Iterator[tuple[list[list[torch.Tensor]], Callable[..., None]]]:
    """Pre-hooks appending ``select(x)`` of each module's input ``x`` to one list per module; yields
    ``(captured, run)`` where ``run(**forward_kwargs)`` runs the model's forward and stops it after the last module
    (layers above it are never run)."""
    captured: list[list[torch.Tensor]] = [[] for _ in modules]

    def make_hook(slot: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured[slot].append(select(args[0] if args else kwargs["x"]))
            if slot == len(modules) - 1:
                raise _StopForward

        return hook

    def run(model: nn.Module, **forward_kwargs: torch.Tensor) -> None:
        try:
            model(**forward_kwargs)
        except _StopForward:
            pass

    handles = [m.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        yield captured, run
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def layer_inputs(model: nn.Module, modules: Sequence[nn.Module], sequences: list[list[int]], pad: int,
                 positions: list[int] | None = None, batch_size: int = 32, desc: str | None = None,
                 shared: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Inputs of each module in ``modules`` for token ``positions[i]`` of ``sequences[i]`` ([N, d_in] each).

    ``positions=None`` returns every (non-pad) token of every sequence instead. The forward pass stops
    after the last module (layers above it are never run), and sequences end at their position (the tokens after it
    cannot change its inputs). ``shared[i]`` = how many leading tokens sequence i
    shares with others (the chat template's system turn, earlier chat turns; capped at ``positions[i]``): sequences
    with the same leading tokens run on one cache of them (:mod:`.prefix_cache`), computed once.
    """
    if shared is not None and positions is None:
        raise ValueError("shared prefixes need positions: the inputs of a cached prefix's tokens are not read")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, sequence in enumerate(sequences):
        cut = min(shared[i], positions[i]) if shared is not None and positions is not None else 0
        groups.setdefault(tuple(sequence[:cut]), []).append(i)
    state: dict[str, torch.Tensor] = {}

    def select(x: torch.Tensor) -> torch.Tensor:
        if positions is None:
            return x[state["mask"]].float()
        return x[torch.arange(x.shape[0]), state["pos"]].float()

    device = next(model.parameters()).device
    batches = [(prefix, members[start:start + batch_size]) for prefix, members in groups.items()
               for start in range(0, len(members), batch_size)]
    caches = {prefix: _prefix_cache(model, modules, list(prefix), device) for prefix in groups if prefix}
    decoder = decoder_of(model)
    order: list[int] = []
    with captured_inputs(modules, select) as (outputs, run), grouped_query_attention(device):
        for prefix, batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
            order += batch
            cut = len(prefix)
            # causal attention: no token after a sequence's position is needed
            end = [len(sequences[i]) if positions is None else positions[i] + 1 for i in batch]
            ids, mask = pad_batch([sequences[i][cut:stop] for i, stop in zip(batch, end)], pad)
            state["mask"] = mask.bool().to(device)
            if positions is not None:
                state["pos"] = torch.tensor([positions[i] - cut for i in batch], device=device)
            if not cut:
                run(model, input_ids=ids.to(device), attention_mask=mask.to(device))
                continue
            mask = torch.cat([torch.ones(len(batch), cut, dtype=mask.dtype), mask], dim=1)
            run(decoder, input_ids=ids.to(device), attention_mask=mask.to(device),
                position_ids=torch.arange(cut, cut + ids.shape[1], device=device).expand(len(batch), -1),
                use_cache=True, **{cache_argument(type(decoder)): repeated(caches[prefix], len(batch))})
    d_in = [getattr(m, "in_features", 0) for m in modules]
    inverse = torch.argsort(torch.tensor(order)) if positions is not None else None
    return [(torch.cat(o)[inverse] if inverse is not None else torch.cat(o)) if o else torch.zeros(0, d)
            for o, d in zip(outputs, d_in)]


def _prefix_cache(model: nn.Module, modules: Sequence[nn.Module], prefix: list[int], device: torch.device
                  ) -> DynamicCache:
    """The key/value cache of ``prefix`` (batch 1) up to the last of ``modules``' layers."""
    decoder = decoder_of(model)
    cache = DynamicCache()
    with captured_inputs(modules, lambda x: x[:0]) as (_, run):
        run(decoder, input_ids=torch.tensor([prefix], device=device), use_cache=True,
            **{cache_argument(type(decoder)): cache})
    return cache


def cluster_keys(inputs: torch.Tensor, owner: torch.Tensor, cluster_sizes: list[int], n_contexts: int,
                 max_keys: int, n_histories: int = 0) -> list[torch.Tensor]:
    """Per preference i, its keys [≤ max_keys + n_histories, d] from ``inputs`` [N, d] (rows of preference i
    where ``owner == i``, ordered question-major: question × context, context 0 = the bare prompt; then
    ``n_histories`` rows of its question after earlier chat turns, kept as keys of their own)."""
    keys = []
    for i, size in enumerate(cluster_sizes):
        rows = inputs[owner == i]
        rows, history = rows[: size * n_contexts].reshape(size, n_contexts, -1), rows[size * n_contexts:]
        own = torch.cat([rows[:, 0], rows.mean(1)]) if n_contexts > 1 else rows[:, 0]
        keys.append(torch.cat([kmeans(own, max_keys), history[:n_histories]]))
    return keys
