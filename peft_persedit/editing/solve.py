"""Solve: the closed-form edit of each cluster, MEMIT's least squares restricted to the cluster's keys.

MEMIT solves ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ jointly. With gates, cluster c's slot only ever sees inputs near
its own keys K_c, so the joint solve splits into independent blocks. Every key of a cluster asks for the
same residual δ_c, hence each block is rank one:

    a_c = C⁻¹ K_cᵀ (G_c + ε tr(G_c)/n_c · I)⁻¹ 1,   G_c = K_c C⁻¹ K_cᵀ,     ΔW_c = δ_c a_cᵀ

so that ΔW_c k_j ≈ δ_c for every key k_j of the cluster while ‖ΔW_c‖ is minimal in the C⁻¹ metric
(directions common in ordinary text are changed least). ``C = I`` reproduces ROME without mom2.
"""

from __future__ import annotations

import torch


def solve_clusters(keys: list[torch.Tensor], residuals: torch.Tensor, c_inverse: torch.Tensor | None,
                   ridge: float = 1e-3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per cluster c: ``A_c`` [1, d_in] and ``B_c`` [d_out, 1] with B_c A_c k ≈ δ_c for k ∈ keys[c].

    ``keys[c]`` is [n_c, d_in] (raw layer inputs), ``residuals`` [C, d_out], ``c_inverse`` C⁻¹ or None.
    """
    if not keys:
        return [], []
    stacked = torch.cat(keys).float()
    metric = stacked.T if c_inverse is None else c_inverse.float() @ stacked.T  # C⁻¹ Kᵀ, [d_in, N]
    A, B, start = [], [], 0
    for c, k in enumerate(keys):
        n_c = k.shape[0]
        ck = metric[:, start:start + n_c]
        gram = k.float() @ ck
        gram = gram + ridge * gram.diagonal().mean().clamp(min=1e-12) * torch.eye(n_c)
        weights = torch.linalg.solve(gram.double(), torch.ones(n_c, 1, dtype=torch.float64)).float()
        A.append((ck @ weights).T)
        B.append(residuals[c].float()[:, None])
        start += n_c
    return A, B
