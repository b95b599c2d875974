"""Edit banks: the tensors one adapter holds in one layer, and their packed multi-adapter layout.

One adapter's bank in one layer (all rows grouped by cluster c = 0..C-1):

    keys        [K, d_in]   unit vectors (already centred by ``center``)
    key_cluster [K]         cluster of each key
    tau         [C]         gate threshold of each cluster
    A           [R, d_in]   low-rank factors, rank rows grouped by cluster
    B           [d_out, R]
    rank_cluster[R]         cluster of each rank row
    shift       [C, d_out]  constant (representation) delta of each cluster
    center      [d_in]      μ subtracted from x before the cosine

    delta(x) = Σ_c g_c(x) · (B_c A_c x + shift_c),   g_c(x) = gate(max_{k∈c} cos(x − μ, K_k) − τ_c)

A :class:`PackedBank` concatenates the banks of several adapters (cluster ids made global) so one
call serves a batch whose rows use different adapters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GATE_MODES = {"hard": 0, "soft": 1, "none": 2}


@dataclass
class EditBank:
    """One adapter's bank in one layer (see module docstring for shapes)."""

    keys: torch.Tensor
    key_cluster: torch.Tensor
    tau: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    rank_cluster: torch.Tensor
    shift: torch.Tensor
    center: torch.Tensor
    gate: str = "hard"
    temperature: float = 0.02

    @property
    def num_clusters(self) -> int:
        return int(self.tau.shape[0])


@dataclass
class PackedBank:
    """Banks of ``n`` adapters concatenated; per-cluster gate mode/temperature and owning adapter.

    ``key_offsets``, ``cluster_offsets`` and ``rank_offsets`` ([n + 1]) delimit each adapter's rows.
    """

    keys: torch.Tensor
    key_cluster: torch.Tensor
    tau: torch.Tensor
    gate_mode: torch.Tensor
    temperature: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    rank_cluster: torch.Tensor
    shift: torch.Tensor
    center: torch.Tensor
    cluster_adapter: torch.Tensor
    key_offsets: torch.Tensor
    cluster_offsets: torch.Tensor
    rank_offsets: torch.Tensor

    @property
    def num_adapters(self) -> int:
        return int(self.center.shape[0])

    @property
    def num_clusters(self) -> int:
        return int(self.tau.shape[0])


def _offsets(sizes: list[int], device: torch.device) -> torch.Tensor:
    out = torch.zeros(len(sizes) + 1, dtype=torch.long, device=device)
    if sizes:
        out[1:] = torch.tensor(sizes, dtype=torch.long, device=device).cumsum(0)
    return out


def pack_banks(banks: list[EditBank], dtype: torch.dtype | None = None) -> PackedBank:
    """Concatenate ``banks`` (one per adapter) into one :class:`PackedBank` with global cluster ids."""
    if not banks:
        raise ValueError("pack_banks needs at least one bank")
    ref = banks[0]
    device, dtype = ref.A.device, dtype or ref.A.dtype
    d_in, d_out = ref.center.shape[0], ref.shift.shape[1]
    cluster_base = _offsets([b.num_clusters for b in banks], device)
    key_cluster, rank_cluster, modes, temps, owners = [], [], [], [], []
    for i, bank in enumerate(banks):
        if bank.center.shape[0] != d_in or bank.shift.shape[1] != d_out:
            raise ValueError(f"bank {i} has shape (d_in={bank.center.shape[0]}, d_out={bank.shift.shape[1]}), "
                             f"expected ({d_in}, {d_out})")
        key_cluster.append(bank.key_cluster.to(device=device, dtype=torch.long) + cluster_base[i])
        rank_cluster.append(bank.rank_cluster.to(device=device, dtype=torch.long) + cluster_base[i])
        modes.append(torch.full((bank.num_clusters,), GATE_MODES[bank.gate], dtype=torch.long, device=device))
        temps.append(torch.full((bank.num_clusters,), float(bank.temperature), dtype=torch.float32, device=device))
        owners.append(torch.full((bank.num_clusters,), i, dtype=torch.long, device=device))

    def cat(name: str, dim: int = 0) -> torch.Tensor:
        return torch.cat([getattr(b, name).to(device=device, dtype=dtype) for b in banks], dim=dim)

    return PackedBank(
        keys=cat("keys"),
        key_cluster=torch.cat(key_cluster),
        tau=torch.cat([b.tau.to(device=device, dtype=torch.float32) for b in banks]),
        gate_mode=torch.cat(modes),
        temperature=torch.cat(temps),
        A=cat("A"),
        B=cat("B", dim=1),
        rank_cluster=torch.cat(rank_cluster),
        shift=cat("shift"),
        center=torch.stack([b.center.to(device=device, dtype=dtype) for b in banks]),
        cluster_adapter=torch.cat(owners),
        key_offsets=_offsets([b.keys.shape[0] for b in banks], device),
        cluster_offsets=cluster_base,
        rank_offsets=_offsets([b.A.shape[0] for b in banks], device),
    )


def single_bank_packed(bank: EditBank) -> PackedBank:
    """A bank as a one-adapter :class:`PackedBank` (keeps autograd: no dtype cast, no copy of A/B)."""
    return pack_banks([bank], dtype=bank.A.dtype)
