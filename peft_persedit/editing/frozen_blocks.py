"""The decoder blocks below the edit layer, run once per chunk instead of on every value step.

δ_i enters at the edit layer's output, and nothing in the blocks below it depends on δ (their banks, if any, do
not change while values are optimized). So on a chunk's suffix, blocks 0 … b − 1 (b = the edit layer's block)
give the same output h_{b−1} at every step: it is computed once (a forward stopped after block b − 1) and each step
replays it, the blocks' ``forward`` returning h_{b−1} without computing anything. The blocks above run as usual,
on the key/value cache of the prefix (the skipped blocks leave their layers of it untouched, which nothing after
them reads in that forward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class _Stop(Exception):
    """Raised after the last frozen block: the rest of the forward is not needed."""


def _block_list(model: nn.Module, module: nn.Module) -> tuple[nn.ModuleList, int] | None:
    """The ModuleList of decoder blocks and the index of the block holding ``module`` (None if there is none)."""
    for container in model.modules():
        if isinstance(container, nn.ModuleList):
            for index, block in enumerate(container):
                if any(m is module for m in block.modules()):
                    return container, index
    return None


def select_rows(output: Any, rows: torch.Tensor) -> Any:
    """``output`` (a block's: a tensor, or a tuple with the hidden states first) restricted to batch ``rows``."""
    if isinstance(output, torch.Tensor):
        return output[rows]
    return (output[0][rows], *output[1:])


class FrozenBlocks:
    """The blocks below ``module``'s block in ``model``: :meth:`capture` their output once, :meth:`replay` it."""

    def __init__(self, model: nn.Module, module: nn.Module) -> None:
        found = _block_list(model, module)
        self.blocks: list[nn.Module] = list(found[0][: found[1]]) if found else []

    def __bool__(self) -> bool:
        return bool(self.blocks)

    @torch.no_grad()
    def capture(self, forward: Callable[[], Any]) -> Any:
        """Run ``forward`` (a forward of the decoder) up to the last frozen block; return that block's output."""
        seen: list[Any] = []

        def stop(module: nn.Module, args: tuple, output: Any) -> None:
            seen.append(output)
            raise _Stop

        handle = self.blocks[-1].register_forward_hook(stop)
        try:
            forward()
        except _Stop:
            pass
        finally:
            handle.remove()
        return seen[0]

    @contextmanager
    def replay(self, output: Any) -> Iterator[None]:
        """Within the context every frozen block returns ``output`` (the last one's, from :meth:`capture`)."""
        saved = [block.__dict__.get("forward") for block in self.blocks]
        for block in self.blocks:
            block.forward = lambda *args, **kwargs: output
        try:
            yield
        finally:
            for block, forward in zip(self.blocks, saved):
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward
