"""PyTorch reference for the gated edit: the CPU path, the autograd path and the oracle of the Triton kernels.

For token t with adapter a = adapter_index[t] (−1 = no edit):

    s_{t,c}  = max_{k ∈ c} cos(x_t − μ_a, K_k)                 (clusters of adapter a only)
    g_{t,c}  = 1[s ≥ τ_c] | σ((s − τ_c)/T_c) | 1               (hard | soft | none; τ_c = −∞ → 1)
    Δ_t      = Σ_c g_{t,c} (B_c A_c x_t + shift_c)

Only the rank rows of clusters that fire somewhere in the batch are multiplied (no dense [T, C, d] tensor).
"""

from __future__ import annotations

import torch

from .bank import GATE_MODES, PackedBank


def cluster_scores(x: torch.Tensor, bank: PackedBank, adapter_index: torch.Tensor) -> torch.Tensor:
    """``s`` [T, C] in fp32: best cosine of each token to each cluster of its own adapter, −inf elsewhere."""
    num_tokens, num_clusters = x.shape[0], bank.num_clusters
    scores = torch.full((num_tokens, num_clusters), float("-inf"), device=x.device, dtype=torch.float32)
    if bank.keys.shape[0] == 0 or num_tokens == 0:
        return scores
    safe_index = adapter_index.clamp(min=0)
    centred = x.float() - bank.center.float()[safe_index]
    sims = torch.nn.functional.normalize(centred, dim=-1) @ bank.keys.float().T  # [T, K]
    key_adapter = bank.cluster_adapter[bank.key_cluster]
    sims = sims.masked_fill(key_adapter[None, :] != adapter_index[:, None], float("-inf"))
    index = bank.key_cluster[None, :].expand(num_tokens, -1)
    return scores.scatter_reduce(1, index, sims, reduce="amax", include_self=True)


def gate_values(scores: torch.Tensor, bank: PackedBank, adapter_index: torch.Tensor) -> torch.Tensor:
    """``g`` [T, C] in fp32 from the scores and each cluster's gate mode (hard / soft / none)."""
    tau = bank.tau.float()[None, :]
    own = bank.cluster_adapter[None, :] == adapter_index[:, None]
    hard = (scores >= tau).float()
    soft = torch.sigmoid((scores - tau) / bank.temperature.float()[None, :].clamp(min=1e-6))
    mode = bank.gate_mode[None, :]
    gate = torch.where(mode == GATE_MODES["hard"], hard, torch.where(mode == GATE_MODES["soft"], soft, 1.0))
    gate = torch.where(torch.isneginf(tau), 1.0, gate)  # τ = −∞: the cluster always fires
    return gate * own.float()


def gated_edit_reference(x: torch.Tensor, bank: PackedBank, adapter_index: torch.Tensor | None = None) -> torch.Tensor:
    """Δ [T, d_out] for tokens ``x`` [T, d_in] (any float dtype; math in fp32, result in ``x.dtype``)."""
    if adapter_index is None:
        adapter_index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    adapter_index = adapter_index.to(device=x.device, dtype=torch.long)
    gates = gate_values(cluster_scores(x, bank, adapter_index), bank, adapter_index)
    fired = gates.ne(0).any(dim=0)
    delta = x.new_zeros((x.shape[0], bank.shift.shape[1]), dtype=torch.float32)
    if not bool(fired.any()):
        return delta.to(x.dtype)
    rows = fired[bank.rank_cluster].nonzero().squeeze(-1)
    if rows.numel():
        hidden = (x.float() @ bank.A[rows].float().T) * gates[:, bank.rank_cluster[rows]]
        delta = delta + hidden @ bank.B[:, rows].float().T
    clusters = fired.nonzero().squeeze(-1)
    delta = delta + gates[:, clusters] @ bank.shift[clusters].float()
    return delta.to(x.dtype)
