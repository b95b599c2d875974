"""PyTorch reference for the gated edit: the CPU path, the autograd path and the oracle of the Triton kernels.

For token t with adapter a = adapter_index[t] (−1 = no edit):

    s_{t,c}  = max_{k ∈ c} cos(x_t − μ_a, K_k)                 (clusters of adapter a only)
    g_{t,c}  = 1[s ≥ τ_c] | σ((s − τ_c)/T_c) | 1               (hard | soft | none; τ_c = −∞ → 1)
    Δ_t      = Σ_c g_{t,c} (B_c A_c x_t + shift_c)

Only the rows of tokens where some cluster fires, and the rank rows of clusters that fire somewhere in the
batch, are multiplied (no dense [T, C, d] tensor).
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
    center = bank.center.float()
    centred = x.float() - (center[0] if bank.num_adapters == 1 else center[adapter_index.clamp(min=0)])
    sims = torch.nn.functional.normalize(centred, dim=-1) @ bank.keys.float().T  # [T, K]
    key_adapter = bank.cluster_adapter[bank.key_cluster]
    sims = sims.masked_fill(key_adapter[None, :] != adapter_index[:, None], float("-inf"))
    if bank.keys.shape[0] == num_clusters and torch.equal(bank.key_cluster, torch.arange(num_clusters,
                                                                                          device=x.device)):
        return sims  # one key per cluster, in order: the max over one key is the key's cosine
    index = bank.key_cluster[None, :].expand(num_tokens, -1)
    return scores.scatter_reduce(1, index, sims, reduce="amax", include_self=True)


def gate_values(scores: torch.Tensor, bank: PackedBank, adapter_index: torch.Tensor) -> torch.Tensor:
    """``g`` [T, C] in fp32 from the scores and each cluster's gate mode (hard / soft / none)."""
    tau = bank.tau.float()[None, :]
    mode = bank.gate_mode[None, :]
    gate = (scores >= tau).float()  # hard; soft / none / τ = −∞ clusters are overwritten below (when present)
    if bool((bank.gate_mode == GATE_MODES["soft"]).any()):
        soft = torch.sigmoid((scores - tau) / bank.temperature.float()[None, :].clamp(min=1e-6))
        gate = torch.where(mode == GATE_MODES["soft"], soft, gate)
    if bool((bank.gate_mode == GATE_MODES["none"]).any()):
        gate = torch.where(mode == GATE_MODES["none"], 1.0, gate)
    if bool(torch.isneginf(bank.tau).any()):
        gate = torch.where(torch.isneginf(tau), 1.0, gate)  # τ = −∞: the cluster always fires
    own = bank.cluster_adapter[None, :] == adapter_index[:, None]
    return gate * own.float()


def gated_edit_reference(x: torch.Tensor, bank: PackedBank, adapter_index: torch.Tensor | None = None) -> torch.Tensor:
    """Δ [T, d_out] for tokens ``x`` [T, d_in] (any float dtype; math in fp32, result in ``x.dtype``)."""
    if adapter_index is None:
        adapter_index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    adapter_index = adapter_index.to(device=x.device, dtype=torch.long)
    gates = gate_values(cluster_scores(x, bank, adapter_index), bank, adapter_index)
    active = gates.ne(0)
    fired = active.any(dim=0)
    delta = x.new_zeros((x.shape[0], bank.shift.shape[1]), dtype=torch.float32)
    if not bool(fired.any()):
        return delta.to(x.dtype)
    tokens = active.any(dim=1).nonzero().squeeze(-1)  # only rows where some cluster fires
    gates = gates[tokens]
    part = delta.new_zeros((tokens.shape[0], delta.shape[1]))
    rows = fired[bank.rank_cluster].nonzero().squeeze(-1)
    if rows.numel():
        hidden = (x.float()[tokens] @ bank.A[rows].float().T) * gates[:, bank.rank_cluster[rows]]
        part = part + hidden @ bank.B[:, rows].float().T
    clusters = fired.nonzero().squeeze(-1)
    part = part + gates[:, clusters] @ bank.shift[clusters].float()
    return delta.index_add(0, tokens, part).to(x.dtype)
