"""Apply: each preference's solved, calibrated edit becomes one cluster of its adapter's bank in a layer.

Cluster c of preference i in layer l: keys K_i (stored centred on the layer's μ and unit), threshold τ_i,
rank-one delta B_i A_i (B_i = δ_i ∈ R^{d_out×1}, A_i = a_iᵀ ∈ R^{1×d_in}); entry k of the adapter's
``config.preferences`` is cluster ``init_clusters + k``.
"""

from __future__ import annotations

import torch

from ..layer import PersEditLinear


def add_preference_clusters(module: PersEditLinear, adapters: list[str], keys: list[torch.Tensor],
                            tau: torch.Tensor, A: list[torch.Tensor], B: list[torch.Tensor]) -> None:
    """Append one cluster per preference i to ``adapters[i]``'s bank in ``module`` (in order)."""
    for i, adapter in enumerate(adapters):
        module.add_clusters(
            adapter, keys=keys[i], key_cluster=torch.zeros(keys[i].shape[0], dtype=torch.long),
            tau=tau[i:i + 1], A=A[i], B=B[i], rank_cluster=torch.zeros(1, dtype=torch.long))


def set_missing_centers(module: PersEditLinear, adapters: list[str], center: torch.Tensor) -> None:
    """μ of every adapter whose bank in ``module`` is still empty (the first edit fixes it)."""
    for adapter in dict.fromkeys(adapters):
        if module.num_keys(adapter) == 0:
            module.set_center(adapter, center)
