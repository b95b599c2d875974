"""Triton implementation of the gated edit (inference only; oracle: :func:`.reference.gated_edit_reference`).

S-LoRA / Punica style: no dense [T, C, d] tensor is formed, and a token only visits its own adapter's rows.
Every load is converted to fp32 before any arithmetic (bf16/fp16 math is never used, not even in ``tl.dot``).

1. ``_scores_kernel``  tokens sorted by adapter, cut into tiles of one adapter a each; program (tile, key block)
   computes cos(x_t − μ_a, K_k) = ⟨x_t − μ_a, K_k⟩ / max(‖x_t − μ_a‖, ε) for keys key_offsets[a] ≤ k <
   key_offsets[a+1] only, and reduces s_{t,j} = max_{k ∈ j} cos with an fp32 ``atomic_max`` into the gate
   matrix S [T, C_max] (j = cluster index local to the token's adapter, C_max = max_a C_a; −∞ = no key).
2. ``_gate_kernel``    S → G in place: g_{t,j} = 1[s ≥ τ] | σ((s − τ)/T) | 1 (τ = −∞ → 1); 0 for j ≥ C_a, a = −1.
3. torch glue          fired pairs p = (t_p, c_p, g_p) = nonzero(G), token-major (c_p global cluster id).
4. ``_shrink_kernel``  sgmv shrink: pairs grouped by cluster, tiles of one cluster c; H_p = g_p · A_c x_{t_p}.
5. ``_expand_kernel``  bgmv expand: program per (token, d_out block), Δ_t = Σ_{p ∋ t} B_c H_p + g_p shift_c
   (tokens without pairs exit at once; deterministic: no atomics on Δ).

The gate matrix costs 4·T·C_max bytes (4 MB for T = 1000, C_max = 1000). A soft gate is > 0 for nearly every
cluster of the token's adapter, so soft banks fire (almost) every pair: exact, but as costly as a dense LoRA of
rank R_a. Host syncs: two when a pack is first used (its :class:`.bank.KernelMeta`, cached on the pack), then
one per call (the number of fired pairs).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .bank import GATE_MODES, KernelMeta, PackedBank, index_ranges

_EPS = 1e-12  # torch.nn.functional.normalize's ε
_TEMPERATURE_MIN = 1e-6


# ----------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _tile_entries(order_ptr, tile_start_ptr, tile, count, BLOCK: tl.constexpr):
    """(mask, entries): the tile's ``count`` ≤ BLOCK entries of ``order``, from its start ``tile_start[tile]``."""
    slots = tl.arange(0, BLOCK)
    ok = slots < count
    return ok, tl.load(order_ptr + tl.load(tile_start_ptr + tile) + slots, mask=ok, other=0)


@triton.jit
def _scores_kernel(x_ptr, center_ptr, keys_ptr, key_cluster_ptr, key_offsets_ptr, cluster_offsets_ptr,
                   order_ptr, tile_adapter_ptr, tile_start_ptr, tile_count_ptr, scores_ptr,
                   d_in, c_max, stride_x, stride_center, stride_keys, eps,
                   BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """S[t, j] ← max(S[t, j], cos(x_t − μ_a, K_k)) for the tile's tokens t and keys k of block ``program_id(1)``."""
    tile = tl.program_id(0)
    count = tl.load(tile_count_ptr + tile)
    if count == 0:
        return
    adapter = tl.load(tile_adapter_ptr + tile)
    key_end = tl.load(key_offsets_ptr + adapter + 1)
    key0 = tl.load(key_offsets_ptr + adapter) + tl.program_id(1) * BLOCK_K
    if key0 >= key_end:
        return
    row_ok, tokens = _tile_entries(order_ptr, tile_start_ptr, tile, count, BLOCK_T)
    keys = key0 + tl.arange(0, BLOCK_K)
    key_ok = keys < key_end
    dots = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    sq_norm = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for d0 in range(0, d_in, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < d_in
        x_ok = row_ok[:, None] & col_ok[None, :]
        xt = tl.load(x_ptr + tokens[:, None] * stride_x + cols[None, :], mask=x_ok, other=0.0).to(tl.float32)
        mu = tl.load(center_ptr + adapter * stride_center + cols, mask=col_ok, other=0.0).to(tl.float32)
        centred = tl.where(x_ok, xt - mu[None, :], 0.0)
        sq_norm += tl.sum(centred * centred, axis=1)
        kt = tl.load(keys_ptr + keys[None, :] * stride_keys + cols[:, None],
                     mask=col_ok[:, None] & key_ok[None, :], other=0.0).to(tl.float32)
        dots += tl.dot(centred, kt, input_precision="ieee")
    norm = tl.maximum(tl.sqrt_rn(sq_norm), eps)
    cos = tl.div_rn(dots, norm[:, None])
    local = tl.load(key_cluster_ptr + keys, mask=key_ok, other=0) - tl.load(cluster_offsets_ptr + adapter)
    tl.atomic_max(scores_ptr + tokens[:, None] * c_max + local[None, :], cos,
                  mask=row_ok[:, None] & key_ok[None, :])


@triton.jit
def _gate_kernel(scores_ptr, adapter_index_ptr, cluster_offsets_ptr, tau_ptr, gate_mode_ptr, temperature_ptr,
                 num_tokens, c_max, temperature_min,
                 HARD: tl.constexpr, SOFT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """G[t, j] = gate_c(S[t, j]) with c = cluster_offsets[a_t] + j, in place; 0 outside the token's adapter."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    local = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < num_tokens
    adapter = tl.load(adapter_index_ptr + rows, mask=row_ok, other=-1)
    owner = tl.maximum(adapter, 0)
    first = tl.load(cluster_offsets_ptr + owner, mask=row_ok, other=0)
    size = tl.load(cluster_offsets_ptr + owner + 1, mask=row_ok, other=0) - first
    valid = (adapter >= 0)[:, None] & (local[None, :] < size[:, None])
    cluster = first[:, None] + local[None, :]
    ptrs = scores_ptr + rows[:, None] * c_max + local[None, :]
    score = tl.load(ptrs, mask=valid, other=float("-inf"))
    tau = tl.load(tau_ptr + cluster, mask=valid, other=0.0)
    mode = tl.load(gate_mode_ptr + cluster, mask=valid, other=HARD)
    temperature = tl.maximum(tl.load(temperature_ptr + cluster, mask=valid, other=1.0), temperature_min)
    hard = tl.where(score >= tau, 1.0, 0.0)
    soft = tl.sigmoid(tl.div_rn(score - tau, temperature))
    gate = tl.where(mode == HARD, hard, tl.where(mode == SOFT, soft, 1.0))
    gate = tl.where(tau == float("-inf"), 1.0, gate)
    tl.store(ptrs, tl.where(valid, gate, 0.0), mask=row_ok[:, None] & (local[None, :] < c_max))


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, hidden_ptr, pair_order_ptr, pair_token_ptr, pair_gate_ptr,
                   tile_cluster_ptr, tile_start_ptr, tile_count_ptr, rank_start_ptr, rank_count_ptr,
                   d_in, stride_x, stride_a,
                   BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """H[p, :] = g_p · A_c x_{t_p} for the tile's pairs p, all of one cluster c (rank rows padded to BLOCK_R)."""
    tile = tl.program_id(0)
    count = tl.load(tile_count_ptr + tile)
    if count == 0:
        return
    cluster = tl.load(tile_cluster_ptr + tile)
    slot_ok, pairs = _tile_entries(pair_order_ptr, tile_start_ptr, tile, count, BLOCK_P)
    tokens = tl.load(pair_token_ptr + pairs, mask=slot_ok, other=0)
    gates = tl.load(pair_gate_ptr + pairs, mask=slot_ok, other=0.0)
    rank0 = tl.load(rank_start_ptr + cluster)
    rank_count = tl.load(rank_count_ptr + cluster)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank_count
    hidden = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, tl.where(rank_count > 0, d_in, 0), BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < d_in
        xt = tl.load(x_ptr + tokens[:, None] * stride_x + cols[None, :],
                     mask=slot_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        at = tl.load(a_ptr + (rank0 + ranks)[None, :] * stride_a + cols[:, None],
                     mask=col_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
        hidden += tl.dot(xt, at, input_precision="ieee")
    hidden = hidden * gates[:, None]
    tl.store(hidden_ptr + pairs[:, None] * BLOCK_R + ranks[None, :], hidden, mask=slot_ok[:, None])


@triton.jit
def _expand_kernel(out_ptr, hidden_ptr, b_ptr, shift_ptr, pair_cluster_ptr, pair_gate_ptr,
                   token_start_ptr, token_count_ptr, rank_start_ptr, rank_count_ptr,
                   d_out, stride_out, stride_b_out, stride_b_rank, stride_shift,
                   HIDDEN_STRIDE: tl.constexpr, HAS_RANK: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    """Δ[t, cols] = Σ_p (B_{c_p} H_p + g_p shift_{c_p})[cols] over the pairs p of token t = ``program_id(0)``."""
    token = tl.program_id(0).to(tl.int64)
    count = tl.load(token_count_ptr + token)
    if count == 0:
        return
    pair0 = tl.load(token_start_ptr + token)
    cols = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    col_ok = cols < d_out
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for q0 in range(0, count, BLOCK_P):
        slots = q0 + tl.arange(0, BLOCK_P)
        slot_ok = slots < count
        clusters = tl.load(pair_cluster_ptr + pair0 + slots, mask=slot_ok, other=0)
        gates = tl.load(pair_gate_ptr + pair0 + slots, mask=slot_ok, other=0.0)
        shift = tl.load(shift_ptr + clusters[:, None] * stride_shift + cols[None, :],
                        mask=slot_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(shift * gates[:, None], axis=0)
        if HAS_RANK:  # flattened (pair, rank row) axis j = slot · BLOCK_R + r
            flat = tl.arange(0, BLOCK_P * BLOCK_R)
            slot_j = q0 + flat // BLOCK_R
            rank_j = flat % BLOCK_R
            cluster_j = tl.load(pair_cluster_ptr + pair0 + slot_j, mask=slot_j < count, other=0)
            ok_j = (slot_j < count) & (rank_j < tl.load(rank_count_ptr + cluster_j))
            rows_j = tl.load(rank_start_ptr + cluster_j) + rank_j
            h = tl.load(hidden_ptr + (pair0 + slot_j) * HIDDEN_STRIDE + rank_j, mask=ok_j, other=0.0)
            bt = tl.load(b_ptr + cols[:, None] * stride_b_out + rows_j[None, :] * stride_b_rank,
                         mask=col_ok[:, None] & ok_j[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(bt * h[None, :], axis=1)
    tl.store(out_ptr + token * stride_out + cols, acc, mask=col_ok)


INTERPRETED = type(_scores_kernel).__name__ == "InterpretedFunction"
"""True when the kernels were defined under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""


# ------------------------------------------------------------------------------------------------ torch glue
def _tiles(counts: torch.Tensor, starts: torch.Tensor, block: int, num_slots: int) -> tuple[torch.Tensor, ...]:
    """Cut segments (``counts``/``starts`` [S]) into tiles of ≤ ``block`` rows; ``num_slots`` ≥ the tile count.

    Returns per slot (segment, first row, rows); slots past the last tile get 0 rows. No host sync.
    """
    per_segment = (counts + block - 1) // block
    end = per_segment.cumsum(0)
    slots = torch.arange(num_slots, device=counts.device)
    segment = torch.searchsorted(end, slots, right=True).clamp(max=counts.numel() - 1)
    local = slots - (end - per_segment)[segment]
    rows = (counts[segment] - local * block).clamp(0, block)
    return segment, starts[segment] + local * block, rows


def _next_pow2(n: int, least: int) -> int:
    return max(least, triton.next_power_of_2(max(n, 1)))


def _gate_matrix(x: torch.Tensor, bank: PackedBank, adapter_index: torch.Tensor, meta: KernelMeta) -> torch.Tensor:
    """G [T, C_max] fp32: g_{t,j} for the j-th cluster of token t's adapter (0 beyond it and for a_t = −1)."""
    num_tokens, num_adapters = x.shape[0], bank.num_adapters
    gates = torch.full((num_tokens, meta.c_max), float("-inf"), device=x.device, dtype=torch.float32)
    if meta.k_max > 0:
        order = torch.argsort(adapter_index, stable=True)
        starts, counts = index_ranges(adapter_index + 1, num_adapters + 1)  # group 0 = base rows (a = −1), sorted first
        block_t = _next_pow2(min(num_tokens, 64), 16)
        block_k = 64 if num_tokens > 64 else 32
        num_slots = triton.cdiv(num_tokens, block_t) + num_adapters
        tile_adapter, tile_start, tile_count = _tiles(counts[1:], starts[1:], block_t, num_slots)
        _scores_kernel[(num_slots, triton.cdiv(meta.k_max, block_k))](
            x, bank.center, bank.keys, bank.key_cluster, bank.key_offsets, bank.cluster_offsets,
            order, tile_adapter, tile_start, tile_count, gates,
            x.shape[1], meta.c_max, x.stride(0), bank.center.stride(0), bank.keys.stride(0), _EPS,
            BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_D=32)
    block_t, block_c = 16, 128
    _gate_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(meta.c_max, block_c))](
        gates, adapter_index, bank.cluster_offsets, bank.tau, bank.gate_mode, bank.temperature,
        num_tokens, meta.c_max, _TEMPERATURE_MIN,
        HARD=GATE_MODES["hard"], SOFT=GATE_MODES["soft"], BLOCK_T=block_t, BLOCK_C=block_c)
    return gates


@dataclass
class _Pairs:
    """Fired (token, cluster) pairs, token-major, with their ranges per token (expand) and per cluster (shrink)."""

    token: torch.Tensor  # [P]
    cluster: torch.Tensor  # [P] global cluster id
    gate: torch.Tensor  # [P] fp32
    token_start: torch.Tensor  # [T] first pair of each token (pairs are token-major)
    token_count: torch.Tensor  # [T]
    by_cluster: torch.Tensor  # [P] pair indices sorted by cluster (stable)
    cluster_start: torch.Tensor  # [C] first position of each cluster in ``by_cluster``
    cluster_count: torch.Tensor  # [C]


def _fired_pairs(gates: torch.Tensor, bank: PackedBank, adapter_index: torch.Tensor) -> _Pairs | None:
    """The nonzero entries of the gate matrix as :class:`_Pairs` (``None`` when nothing fired; one host sync)."""
    token, local = gates.nonzero(as_tuple=True)
    if token.numel() == 0:
        return None
    cluster = bank.cluster_offsets[adapter_index[token]] + local
    return _Pairs(token, cluster, gates[token, local].contiguous(), *index_ranges(token, gates.shape[0]),
                  torch.argsort(cluster, stable=True), *index_ranges(cluster, bank.num_clusters))


def _shrink(x: torch.Tensor, pairs: _Pairs, meta: KernelMeta, block_r: int) -> torch.Tensor:
    """H [P, block_r] fp32: H_p = g_p A_{c_p} x_{t_p} (zero beyond the cluster's rank rows)."""
    num_pairs = pairs.token.numel()
    hidden = torch.zeros((num_pairs, block_r), device=x.device, dtype=torch.float32)
    block_p = 16
    num_slots = triton.cdiv(num_pairs, block_p) + min(num_pairs, pairs.cluster_count.numel())
    tile_cluster, tile_start, tile_count = _tiles(pairs.cluster_count, pairs.cluster_start, block_p, num_slots)
    _shrink_kernel[(num_slots,)](
        x, meta.A, hidden, pairs.by_cluster, pairs.token, pairs.gate,
        tile_cluster, tile_start, tile_count, meta.rank_start, meta.rank_count,
        x.shape[1], x.stride(0), meta.A.stride(0),
        BLOCK_P=block_p, BLOCK_R=block_r, BLOCK_D=64)
    return hidden


def _expand(delta: torch.Tensor, hidden: torch.Tensor | None, bank: PackedBank, pairs: _Pairs,
            meta: KernelMeta) -> None:
    """Δ_t = Σ_{p ∋ t} B_{c_p} H_p + g_p shift_{c_p} written into the fired rows of ``delta`` [T, d_out] fp32."""
    block_r = _next_pow2(meta.r_max, 1)
    block_p = max(1, 64 // block_r)
    block_o = 64 if block_p * block_r <= 64 else 32
    d_out = delta.shape[1]
    _expand_kernel[(delta.shape[0], triton.cdiv(d_out, block_o))](
        delta, pairs.gate if hidden is None else hidden, meta.B, bank.shift, pairs.cluster, pairs.gate,
        pairs.token_start, pairs.token_count, meta.rank_start, meta.rank_count,
        d_out, delta.stride(0), meta.B.stride(0), meta.B.stride(1), bank.shift.stride(0),
        HIDDEN_STRIDE=1 if hidden is None else hidden.shape[1], HAS_RANK=hidden is not None,
        BLOCK_P=block_p, BLOCK_R=block_r, BLOCK_O=block_o)


# ----------------------------------------------------------------------------------------------- entry point
def _check(x: torch.Tensor, bank: PackedBank) -> None:
    if x.dim() != 2 or x.shape[1] != bank.center.shape[1]:
        raise ValueError(f"x must be [T, d_in={bank.center.shape[1]}], got {tuple(x.shape)}")
    if bank.keys.device != x.device or bank.A.device != x.device:
        raise ValueError(f"x is on {x.device} but the bank on {bank.keys.device}")
    if not (x.is_cuda or INTERPRETED):
        raise RuntimeError("gated_edit_triton needs CUDA tensors, or TRITON_INTERPRET=1 set before importing "
                           "peft_persedit.kernels.triton_gated_edit (CPU tensors)")


@torch.no_grad()
def gated_edit_triton(x: torch.Tensor, bank: PackedBank, adapter_index: torch.Tensor | None = None,
                      meta: KernelMeta | None = None) -> torch.Tensor:
    """Δ [T, d_out] in ``x.dtype``: Δ_t = Σ_c g_{t,c}(B_c A_c x_t + shift_c), clusters of adapter a_t only.

    ``x`` [T, d_in]; ``adapter_index`` [T] (−1 = no edit; ``None`` = adapter 0 everywhere); ``meta`` defaults to
    ``bank.kernel_meta``. Math in fp32.
    """
    _check(x, bank)
    num_tokens, d_out = x.shape[0], bank.shift.shape[1]
    if adapter_index is None:
        adapter_index = torch.zeros(num_tokens, dtype=torch.long, device=x.device)
    adapter_index = adapter_index.to(device=x.device, dtype=torch.long).contiguous()
    delta = torch.zeros((num_tokens, d_out), device=x.device, dtype=torch.float32)
    meta = bank.kernel_meta if meta is None else meta
    if num_tokens == 0 or meta.c_max == 0:
        return delta.to(x.dtype)
    x = x.contiguous()
    device = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with device:
        pairs = _fired_pairs(_gate_matrix(x, bank, adapter_index, meta), bank, adapter_index)
        if pairs is None:
            return delta.to(x.dtype)
        hidden = _shrink(x, pairs, meta, _next_pow2(meta.r_max, 16)) if meta.r_max > 0 else None
        _expand(delta, hidden, bank, pairs, meta)
    return delta.to(x.dtype)  # cast in torch: the interpreter's fp32 → bf16 store truncates
