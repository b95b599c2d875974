"""Second-moment statistics of an edit layer's inputs: C = E[k kᵀ] and the mean μ = E[k].

Estimated from the model's own neutral text (see :mod:`.selftext`) and cached per model and layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..cache import cache_dir
from .chat import encode, pad_id
from .keys import layer_inputs
from .selftext import model_fingerprint, neutral_corpus


@dataclass
class LayerStats:
    """Statistics of one layer's inputs: ``mean`` [d], ``second_moment`` C [d, d], ``samples`` (tokens)."""

    mean: torch.Tensor
    second_moment: torch.Tensor
    samples: torch.Tensor  # a subsample of raw inputs, reused as gate negatives

    def inverse(self, ridge: float = 1e-2) -> torch.Tensor:
        """(C + ε·tr(C)/d·I)⁻¹ — well conditioned even from a few thousand tokens."""
        c = self.second_moment.double()
        eye = torch.eye(c.shape[0], dtype=c.dtype)
        return torch.linalg.inv(c + ridge * c.diagonal().mean() * eye).float()


def layer_stats(peft_model: nn.Module, tokenizer: PreTrainedTokenizerBase, modules: dict[str, nn.Module],
                max_samples: int = 4096) -> dict[str, LayerStats]:
    """:class:`LayerStats` for each named edit module, from the base model (adapters disabled), cached."""
    base = peft_model.get_base_model()
    folder = cache_dir("stats-v2", model_fingerprint(base))
    missing = [name for name in modules if not (folder / f"{name}.pt").is_file()]
    if missing:
        corpus = neutral_corpus(peft_model, tokenizer)
        sequences = [encode(tokenizer, text) for text in corpus]
        with peft_model.disable_adapter():
            inputs = layer_inputs(peft_model, [modules[n] for n in missing], sequences, pad_id(tokenizer),
                                  desc="statistics C = E[kkᵀ]")
        generator = torch.Generator().manual_seed(0)
        for name, x in zip(missing, inputs):
            keep = torch.randperm(x.shape[0], generator=generator)[:max_samples]
            stats = {"mean": x.mean(0), "second_moment": x.T @ x / x.shape[0], "samples": x[keep].half()}
            tmp = folder / f"{name}.pt.tmp"
            torch.save(stats, tmp)
            tmp.replace(folder / f"{name}.pt")
    out = {}
    for name in modules:
        raw = torch.load(folder / f"{name}.pt")
        out[name] = LayerStats(raw["mean"], raw["second_moment"], raw["samples"].float())
    return out
