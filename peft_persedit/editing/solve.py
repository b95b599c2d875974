"""Solve: the closed-form edit of each cluster, MEMIT's least squares restricted to the cluster's keys.

MEMIT solves ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ jointly. With gates, cluster c's slot only ever sees inputs near
its own keys K_c, so the joint solve splits into independent blocks. Every key of a cluster asks for the
same residual δ_c, hence each block is rank one:

    a_c = C⁻¹ K_cᵀ (G_c + ε tr(G_c)/n_c · I)⁻¹ 1,   G_c = K_c C⁻¹ K_cᵀ,     ΔW_c = δ_c a_cᵀ

so that ΔW_c k_j ≈ δ_c for every key k_j of the cluster while ‖ΔW_c‖ is minimal in the C⁻¹ metric
(directions common in ordinary text are changed least). ``C = I`` reproduces ROME without mom2.

Inputs P_c that the gate cannot tell from the cluster's keys (other preferences' subject tokens scoring ≥ τ_c,
e.g. "preference" in "food preference" and "seasonal preference") are preserved, MEMIT-style: with
K'_c = [K_c; P_c] and t = [1, …, 1, 0, …, 0],

    a_c = C⁻¹ K'_cᵀ (G'_c + ε tr(G'_c)/n'_c · I)⁻¹ t,    so that ΔW_c k ≈ δ_c on K_c and ΔW_c p ≈ 0 on P_c.
"""

from __future__ import annotations

import torch


def solve_clusters(keys: list[torch.Tensor], residuals: torch.Tensor, c_inverse: torch.Tensor | None,
                   ridge: float = 1e-3, preserve: list[torch.Tensor] | None = None
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per cluster c: ``A_c`` [1, d_in] and ``B_c`` [d_out, 1] with B_c A_c k ≈ δ_c for k ∈ keys[c] (and
    B_c A_c p ≈ 0 for p ∈ preserve[c]).

    ``keys[c]`` is [n_c, d_in] (raw layer inputs), ``residuals`` [C, d_out], ``c_inverse`` C⁻¹ or None,
    ``preserve[c]`` [m_c, d_in] raw inputs (or None: nothing preserved).
    """
    A, B = [], []
    for c, k in enumerate(keys):
        kept = preserve[c] if preserve is not None else k.new_zeros(0, k.shape[1])
        rows = torch.cat([k, kept]).float()  # K'_c
        ck = rows.T if c_inverse is None else c_inverse.float() @ rows.T  # C⁻¹ K'_cᵀ, [d_in, n'_c]
        gram = rows @ ck
        gram = gram + ridge * gram.diagonal().mean().clamp(min=1e-12) * torch.eye(rows.shape[0])
        target = torch.cat([torch.ones(k.shape[0], 1), torch.zeros(kept.shape[0], 1)]).double()
        weights = torch.linalg.solve(gram.double(), target).float()
        A.append((ck @ weights).T)
        B.append(residuals[c].float()[:, None])
    return A, B
