"""Second-moment statistics of an edit layer's inputs: C = E[k kᵀ] and the mean μ = E[k].

Estimated from the model's own neutral text (see :mod:`.selftext`) and cached per model fingerprint and layer
as safetensors (``stats-v3/<fingerprint>/<layer>.safetensors``). An unreadable or inconsistent file is reported
with a warning naming it and recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..atomic import atomic_file
from ..cache import cache_dir, prune, prune_legacy, read_cached, touch
from .chat import encode, pad_id
from .keys import layer_inputs
from .selftext import KEEP_MODELS, model_fingerprint, neutral_corpus

STATS_DIR = "stats-v3"


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


def _read(path: Path, d_in: int) -> LayerStats:
    """Load one layer's statistics; raise ``ValueError`` unless they are complete, finite and ``d_in`` wide."""
    raw = load_file(path)
    mean, c, samples = raw["mean"], raw["second_moment"], raw["samples"]
    if mean.shape != (d_in,) or c.shape != (d_in, d_in) or samples.ndim != 2 or samples.shape[1] != d_in:
        raise ValueError(f"shapes {tuple(mean.shape)}, {tuple(c.shape)}, {tuple(samples.shape)} for d_in={d_in}")
    if not (torch.isfinite(mean).all() and torch.isfinite(c).all() and torch.isfinite(samples).all()):
        raise ValueError("non-finite values")
    return LayerStats(mean, c, samples.float())


def _compute(peft_model: nn.Module, tokenizer: PreTrainedTokenizerBase, modules: dict[str, nn.Module],
             fingerprint: str, max_samples: int) -> dict[str, dict[str, torch.Tensor]]:
    """μ, C and ``max_samples`` random raw inputs for each of ``modules``, from the neutral corpus."""
    corpus = neutral_corpus(peft_model, tokenizer, fingerprint=fingerprint)
    sequences = [encode(tokenizer, text) for text in corpus]
    with peft_model.disable_adapter():
        inputs = layer_inputs(peft_model, list(modules.values()), sequences, pad_id(tokenizer),
                              desc="statistics C = E[kkᵀ]")
    generator = torch.Generator().manual_seed(0)
    out = {}
    for name, x in zip(modules, inputs):
        keep = torch.randperm(x.shape[0], generator=generator)[:max_samples]
        out[name] = {"mean": x.mean(0), "second_moment": x.T @ x / x.shape[0], "samples": x[keep].half()}
    return out


def layer_stats(peft_model: nn.Module, tokenizer: PreTrainedTokenizerBase, modules: dict[str, nn.Module],
                max_samples: int = 4096) -> dict[str, LayerStats]:
    """:class:`LayerStats` for each named edit module, from the base model (adapters disabled), cached."""
    fingerprint = model_fingerprint(peft_model.get_base_model(), tokenizer)
    folder = cache_dir(STATS_DIR, fingerprint)
    touch(folder)
    out = {name: read_cached(folder / f"{name}.safetensors", lambda p, m=module: _read(p, m.in_features))
           for name, module in modules.items()}
    missing = {name: modules[name] for name, stats in out.items() if stats is None}
    if missing:
        computed = _compute(peft_model, tokenizer, missing, fingerprint, max_samples)
        for name, tensors in computed.items():
            with atomic_file(folder / f"{name}.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"model": fingerprint})
            out[name] = LayerStats(tensors["mean"], tensors["second_moment"], tensors["samples"].float())
        prune(folder, "[0-9a-f]{16}", KEEP_MODELS)
        prune_legacy()
    return out
