"""Topic-scoped edits: gated shift clusters whose gate scores the scope router's projected space.

    y = W x + Σ_c g_c(x) · shift_c,    g_c(x) = 1[max_{k∈c} z(x)·K_k ≥ τ_c] · 1[user(row) = user_c]

with z(x) = normalize(P(x − μ)) (:class:`~.scope.ScopeRouter`). Per token and stateless: it fires on the
generation-prompt tokens of any chat whose question is in the cluster's scope, with or without history.
Keys K_k are z of the cluster's variant questions at the generation prompt; τ_c sits above the scores of
negatives (neutral prompts, other topics' questions); shift_c = δ_c is optimized (``values.optimize_values``
with ``span`` = the generation prompt) so that the target is generated across the variants.

This spike applies the bank with a forward hook on the MLP output projection (:meth:`TopicBank.attach`);
serving it from the PERSEDIT layer (projection stored in the adapter, packed kernels) is future work.
"""

from __future__ import annotations

import torch
from torch import nn

from .scope import ScopeRouter


class TopicBank(nn.Module):
    """Topic clusters of many users for one layer; ``row_user`` [B] routes each batch row to its user's ones."""

    def __init__(self, router: ScopeRouter, d_out: int) -> None:
        super().__init__()
        self.router = router
        rank = router.proj.shape[0]
        self.keys = torch.zeros(0, rank)
        self.key_cluster = torch.zeros(0, dtype=torch.long)
        self.tau = torch.zeros(0)
        self.shift = torch.zeros(0, d_out)
        self.cluster_user = torch.zeros(0, dtype=torch.long)
        self.row_user: torch.Tensor | None = None  # None: every row is every cluster's user
        self.enabled = True

    @property
    def num_clusters(self) -> int:
        return int(self.tau.shape[0])

    @torch.no_grad()
    def add(self, keys: torch.Tensor, tau: float, shift: torch.Tensor, user: int) -> int:
        """Append one cluster (``keys`` [m, r] unit projected keys); returns its id."""
        c = self.num_clusters
        self.keys = torch.cat([self.keys, torch.nn.functional.normalize(keys.float(), dim=-1)])
        self.key_cluster = torch.cat([self.key_cluster, torch.full((len(keys),), c, dtype=torch.long)])
        self.tau = torch.cat([self.tau, torch.tensor([float(tau)])])
        self.shift = torch.cat([self.shift, shift.float().reshape(1, -1)])
        self.cluster_user = torch.cat([self.cluster_user, torch.tensor([user])])
        return c

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        """max_{k∈c} z·K_k per cluster: [..., C] for projected ``z`` [..., r]."""
        sim = z @ self.keys.to(z.device).T  # [..., K]
        flat = sim.reshape(-1, sim.shape[-1])
        out = flat.new_full((flat.shape[0], self.num_clusters), float("-inf"))
        index = self.key_cluster.to(z.device).expand_as(flat)
        out = out.scatter_reduce(1, index, flat, reduce="amax")
        return out.reshape(*sim.shape[:-1], self.num_clusters)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Hard gates [B, T, C] for layer inputs ``x`` [B, T, d_in]."""
        g = (self.scores(self.router.project(x)) >= self.tau.to(x.device)).float()
        if self.row_user is not None:
            own = self.row_user.to(x.device)[:, None] == self.cluster_user.to(x.device)[None, :]
            g = g * own[:, None, :].float()
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Δ [B, T, d_out] = g(x) · shift."""
        if not self.num_clusters or not self.enabled:
            return x.new_zeros(*x.shape[:-1], self.shift.shape[1])
        return (self.gates(x) @ self.shift.to(x.device)).to(x.dtype)

    def attach(self, module: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Add Δ to ``module``'s output (the MLP output projection of ``router.layer``)."""

        def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + self(args[0])

        return module.register_forward_hook(hook)


def calibrate_tau(own: torch.Tensor, negatives: torch.Tensor, false_fire: float = 0.005,
                  floor: float = 0.0) -> float:
    """τ_c: the (1 − ``false_fire``) quantile of the negatives' scores (at least ``floor``), but never above the
    median own score (an edit that fires on nothing is useless)."""
    tau = max(float(torch.quantile(negatives.float(), 1.0 - false_fire)) if negatives.numel() else floor, floor)
    return min(tau, float(own.float().median())) if own.numel() else tau
