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

import torch
from torch import nn
from tqdm.auto import tqdm

from .chat import pad_batch
from .clusters import kmeans


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
                 positions: list[int] | None = None, batch_size: int = 32, desc: str | None = None
                 ) -> list[torch.Tensor]:
    """Inputs of each module in ``modules`` for token ``positions[i]`` of ``sequences[i]`` ([N, d_in] each).

    ``positions=None`` returns every (non-pad) token of every sequence instead. The forward pass stops
    after the last module (layers above it are never run).
    """
    state: dict[str, torch.Tensor] = {}

    def select(x: torch.Tensor) -> torch.Tensor:
        if positions is None:
            return x[state["mask"]].float()
        return x[torch.arange(x.shape[0]), state["pos"]].float()

    device = next(model.parameters()).device
    with captured_inputs(modules, select) as (outputs, run):
        for start in tqdm(range(0, len(sequences), batch_size), desc=desc, disable=desc is None, leave=False):
            ids, mask = pad_batch(sequences[start:start + batch_size], pad)
            state["mask"] = mask.bool().to(device)
            if positions is not None:
                state["pos"] = torch.tensor(positions[start:start + batch_size], device=device)
            run(model, input_ids=ids.to(device), attention_mask=mask.to(device))
    d_in = [getattr(m, "in_features", 0) for m in modules]
    return [torch.cat(o) if o else torch.zeros(0, d) for o, d in zip(outputs, d_in)]


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
