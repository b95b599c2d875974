"""Gate calibration: each cluster's threshold τ_c from data.

    s⁺ = scores of the cluster's own key inputs (questions × contexts),  s⁻ = scores of neutral tokens
    (self-generated text, other preferences' prompts).   τ_c = ½ (q_{1−ρ}(s⁻) + min s⁺)

with ρ the allowed false-fire rate. When the two overlap, τ_c = min s⁺ − 10⁻⁴ (efficacy first). The measured
false-fire rate f_c = |{s⁻ ≥ τ_c}| / |s⁻| is reported per preference (``PreferenceResult.false_fire``, the last
edit layer's) in the :class:`~.report.EditReport`. :func:`shifted_thresholds` moves every τ by a common
offset for a while (the gate-threshold sweep of ``persedit eval``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..layer import PersEditLayer


@dataclass
class GateCalibration:
    tau: torch.Tensor  # [C]
    false_fire: torch.Tensor  # [C] share of the (usable) negatives with s ≥ τ


def cluster_max_scores(inputs: torch.Tensor, center: torch.Tensor, unit_keys: list[torch.Tensor]) -> torch.Tensor:
    """s [N, C] = max_{k∈c} cos(x − μ, k) for every input and cluster (keys already centred and unit)."""
    if not unit_keys or inputs.shape[0] == 0:
        return torch.zeros(inputs.shape[0], len(unit_keys))
    x = torch.nn.functional.normalize(inputs.float() - center.float(), dim=-1)
    return torch.stack([(x @ k.float().T).amax(-1) for k in unit_keys], dim=-1)


def calibrate(positive_scores: list[torch.Tensor], negative_scores: torch.Tensor, false_fire_rate: float,
              negative_mask: torch.Tensor | None = None) -> GateCalibration:
    """τ per cluster from its positive scores (list of [n_c]) and negative scores [N, C].

    ``negative_mask`` [N, C] excludes negatives that are legitimately this cluster's (e.g. the same question).
    """
    taus, fires = [], []
    for c, pos in enumerate(positive_scores):
        neg = negative_scores[:, c]
        if negative_mask is not None:
            neg = neg[negative_mask[:, c]]
        pos_min = pos.min() if pos.numel() else torch.tensor(1.0)
        neg_high = torch.quantile(neg, 1 - false_fire_rate) if neg.numel() else torch.tensor(-1.0)
        tau = (neg_high + pos_min) / 2 if neg_high < pos_min else pos_min - 1e-4
        taus.append(tau)
        fires.append((neg >= tau).float().mean() if neg.numel() else torch.tensor(0.0))
    stack = lambda xs: torch.stack(xs) if xs else torch.zeros(0)  # noqa: E731
    return GateCalibration(stack(taus), stack(fires))


def own_subject_mask(n_neutral: int, token_owner: torch.Tensor, is_subject: torch.Tensor,
                     same_subject: torch.Tensor) -> torch.Tensor:
    """[n_neutral + T, C] negatives usable by cluster c: all neutral rows, and every question-and-answer token
    except the subject tokens of questions about c's own subjects (``same_subject`` [P, C]: preference p's question
    is one of c's cluster questions or asks about one of its subjects; token t belongs to preference
    ``token_owner[t]``)."""
    own = is_subject[:, None] & same_subject[token_owner]
    return torch.cat([torch.ones(n_neutral, same_subject.shape[1], dtype=torch.bool), ~own])


def leaked_inputs(inputs: torch.Tensor, scores: torch.Tensor, usable: torch.Tensor, tau: torch.Tensor,
                  limit: int) -> list[torch.Tensor]:
    """Per cluster c: the usable negative ``inputs`` [N, d] its gate still lets through (s_{n,c} ≥ τ_c), highest
    scores first, at most ``limit`` — the solve maps them to 0 (see :mod:`.solve`)."""
    leaks = []
    for c in range(scores.shape[1]):
        s = scores[:, c].masked_fill(~usable[:, c], float("-inf"))
        index = (s >= tau[c]).nonzero().flatten()
        leaks.append(inputs[index[s[index].argsort(descending=True)][:limit]])
    return leaks


@contextmanager
def shifted_thresholds(model: nn.Module, offset: float) -> Iterator[int]:
    """Within the block, every gate threshold of every adapter of every PERSEDIT layer of ``model`` (a PeftModel
    or any module holding edit layers) is moved by ``offset``:

        τ_c ← τ_c + o        (hard gate g_c(x) = 1[max_k cos(x − μ, K_k) ≥ τ_c]; soft gate σ((s − τ_c)/T))

    o < 0 lets gates fire on more inputs (more generalization, less locality), o > 0 on fewer. Always-on
    clusters (τ = −∞) stay always-on; ``gate="none"`` banks ignore τ. Yields the number of finite thresholds
    shifted. On exit — also on an exception — the original τ tensors themselves are put back (bit-identical).
    Tensors change through ``_set_tensor``, so packed-bank caches are invalidated both ways.
    """
    saved: list[tuple[PersEditLayer, str, torch.Tensor]] = []
    shifted = 0
    try:
        for module in model.modules():
            if not isinstance(module, PersEditLayer):
                continue
            for adapter in list(module.persedit_tau.keys()):
                tau = module.persedit_tau[adapter]
                saved.append((module, adapter, tau))
                module._set_tensor("tau", adapter, tau + offset)
                shifted += int(torch.isfinite(tau).sum())
        yield shifted
    finally:
        for module, adapter, tau in reversed(saved):
            module._set_tensor("tau", adapter, tau)
