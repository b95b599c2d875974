"""Scope router: a learned projection P of an edit layer's input in which questions about one topic cluster.

The gate of a topic edit scores z(x) = P(x − μ) / ‖P(x − μ)‖ (P ∈ R^{r×d}) instead of the raw input: raw
inputs at the generation prompt do not separate topics, a projection trained contrastively does. P is trained
once per model and layer on labelled questions (label = attribute type) and unlabelled negatives (neutral
prompts, answer tokens), with the supervised contrastive loss over a batch B:

    L = −1/|B| Σ_i 1/|P(i)| Σ_{j∈P(i)} log( exp(z_i·z_j/T) / Σ_{a∈B∖i} exp(z_i·z_a/T) )
        + λ · mean_{n∈neg, i∈lab} relu(z_n·z_i − α)

(P(i) = other rows with i's label; negatives are in every denominator and have no positives), then cached.
Features are read at the last ``n_tail`` tokens of each chat: the generation prompt, whose inputs at a middle
layer already carry the question's meaning through attention (per token and stateless, so the gate also works
with a KV cache).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .chat import pad_batch
from .keys import captured_inputs


@torch.no_grad()
def tail_inputs(model: nn.Module, module: nn.Module | Sequence[nn.Module], sequences: list[list[int]], pad: int,
                n_tail: int = 4, batch_size: int = 32, desc: str | None = None) -> torch.Tensor | list[torch.Tensor]:
    """Inputs of ``module`` at the last ``n_tail`` tokens of each sequence, [N, n_tail, d_in] (early exit after
    it); for a list of modules (in forward order), one such tensor per module from the same forward passes."""
    modules = [module] if isinstance(module, nn.Module) else list(module)
    device = next(model.parameters()).device
    with captured_inputs(modules, lambda x: x[:, -n_tail:].float().cpu()) as (out, run):
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
            batch = [sequences[i] for i in order[start:start + batch_size]]
            ids, mask = pad_batch(batch, pad, left=True)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            run(model, input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device))
    inverse = torch.argsort(torch.tensor(order)) if sequences else None
    feats = [torch.cat(o)[inverse] if o else torch.zeros(0, n_tail, 0) for o in out]
    return feats[0] if isinstance(module, nn.Module) else feats


@dataclass
class ScopeRouter:
    """z(x) = normalize(P (x − μ)); ``layer`` is the decoder block whose MLP output projection it reads."""

    proj: torch.Tensor  # [r, d_in]
    center: torch.Tensor  # [d_in]
    layer: int

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Unit projected features [..., r] of layer inputs ``x`` [..., d_in]."""
        z = (x.float() - self.center.to(x.device)) @ self.proj.to(x.device).T
        return torch.nn.functional.normalize(z, dim=-1)

    def state(self) -> dict:
        return {"proj": self.proj, "center": self.center, "layer": self.layer}

    @classmethod
    def from_state(cls, state: dict) -> ScopeRouter:
        return cls(state["proj"], state["center"], int(state["layer"]))


def _supcon(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss; rows with label −1 (negatives) have no positives but sit in denominators."""
    sim = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye & (labels[:, None] >= 0)
    count = pos.sum(1)
    has = count > 0
    per_row = -(log_prob.masked_fill(~pos, 0.0).sum(1)[has] / count[has])
    return per_row.mean()


def train_router(features: torch.Tensor, labels: torch.Tensor, layer: int, rank: int = 64, steps: int = 400,
                 lr: float = 1e-2, temperature: float = 0.1, margin: float = 0.3, margin_weight: float = 1.0,
                 batch_size: int = 2048, seed: int = 0, progress: bool = True) -> ScopeRouter:
    """Train P on ``features`` [N, d] with ``labels`` [N] (−1 = negative: neutral text, far from every topic)."""
    generator = torch.Generator().manual_seed(seed)
    center = features.mean(0)
    scale = (features - center).std(0).clamp(min=1e-4)
    x = (features - center) / scale  # standardised inputs: P's optimization is well conditioned
    proj = (torch.randn(rank, x.shape[1], generator=generator) / x.shape[1] ** 0.5).requires_grad_(True)
    optimizer = torch.optim.Adam([proj], lr=lr)
    for _ in tqdm(range(steps), desc=f"scope router L{layer}", disable=not progress, leave=False):
        batch = torch.randperm(len(x), generator=generator)[:batch_size]
        z = torch.nn.functional.normalize(x[batch] @ proj.T, dim=-1)
        y = labels[batch]
        loss = _supcon(z, y, temperature)
        neg, lab = z[y < 0], z[y >= 0]
        if len(neg) and len(lab):
            loss = loss + margin_weight * torch.relu(neg @ lab.T - margin).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return ScopeRouter((proj.detach() / scale).contiguous(), center, layer)
