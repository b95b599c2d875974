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
call serves a batch whose rows use different adapters; its :class:`KernelMeta` (sizes and rank rows regrouped
by cluster, for the Triton kernels) is derived once per pack, on first use, and kept with it.
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

    @property
    def kernel_meta(self) -> KernelMeta:
        """This pack's :class:`KernelMeta`, built on first use and cached on the pack; rebuilt only when a tensor
        it derives from was replaced or changed in place since (its regrouped A/B may be copies)."""
        source = tuple((t.data_ptr(), tensor_version(t)) for t in (
            self.A, self.B, self.rank_cluster, self.key_offsets, self.cluster_offsets))
        cached = self.__dict__.get("_kernel_meta")
        if cached is None or cached[0] != source:
            cached = self.__dict__["_kernel_meta"] = (source, build_kernel_meta(self))
        return cached[1]


@dataclass(frozen=True)
class KernelMeta:
    """A :class:`PackedBank`'s sizes and rank rows regrouped by cluster, as the Triton kernels read them.

    c_max = max_a C_a, k_max = max_a K_a, r_max = max_c R_c; cluster c owns rows rank_start[c] ≤ r <
    rank_start[c] + rank_count[c] of ``A`` [R, d_in] and those columns of ``B`` [d_out, R] (the pack's own
    tensors, detached, when its rows are already grouped; a stably sorted copy otherwise).
    """

    c_max: int
    k_max: int
    r_max: int
    rank_start: torch.Tensor  # [C]
    rank_count: torch.Tensor  # [C]
    A: torch.Tensor  # [R, d_in]
    B: torch.Tensor  # [d_out, R]

    @property
    def sizes(self) -> list[int]:
        return [self.c_max, self.k_max, self.r_max]

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.rank_start, self.rank_count, self.A, self.B]


def tensor_version(t: torch.Tensor) -> int:
    """``t._version``, bumped by every in-place op; −1 for inference tensors (they have none and cannot change)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def index_ranges(index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, count) [size] of each value v < size's run in the sorted order of ``index`` (no host sync)."""
    count = torch.zeros(size, dtype=torch.long, device=index.device)
    count.scatter_add_(0, index, torch.ones_like(index))
    return count.cumsum(0) - count, count


@torch.no_grad()
def build_kernel_meta(bank: PackedBank) -> KernelMeta:
    """Derive ``bank``'s :class:`KernelMeta` (two host syncs); use :attr:`PackedBank.kernel_meta`, which caches it."""
    rank_cluster, A, B = bank.rank_cluster, bank.A.detach(), bank.B.detach()
    if rank_cluster.numel() > 1 and not bool((rank_cluster[1:] >= rank_cluster[:-1]).all()):
        perm = torch.argsort(rank_cluster, stable=True)
        rank_cluster, A, B = rank_cluster[perm], A[perm], B[:, perm]
    rank_start, rank_count = index_ranges(rank_cluster, bank.num_clusters)
    c_max, k_max = torch.stack([bank.cluster_offsets.diff().max(), bank.key_offsets.diff().max()]).tolist()
    r_max = int(rank_count.max()) if rank_count.numel() else 0
    return KernelMeta(c_max, k_max, r_max, rank_start, rank_count, A, B)


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

