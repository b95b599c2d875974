"""CPU cost of the gated edit (PyTorch reference) on SmolLM2-135M shapes, with random weights (no download).

    base      y = W_down (silu(W_gate x) ⊙ W_up x)                     (one MLP, nn.Linear)
    edited    y = base + Σ_c g_c(h)(B_c A_c h + shift_c),  h = silu(W_gate x) ⊙ W_up x   (d_in = 1536, d_out = 576)
    layer     MLP + attention (q/k/v/o projections + causal SDPA, 9 heads, 3 KV heads)
    overhead  (t_edited − t_base) / (30 · t_layer): one edited layer in a 30-layer decoder forward
              (embedding, norms and lm_head left out, so this overstates the overhead)

Banks: 0 / 10 / 1000 clusters, 1 key and rank 1..3 per cluster; keys are random unit vectors except a few
taken from the batch itself, so ~1/16 of the tokens fire one cluster and the rest fire none. All variants run
interleaved in each repeat; medians over ``--repeats``. Usage: ``python benchmarks/bench_kernels_cpu.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads distort timings on shared cores

import torch  # noqa: E402
from torch import nn  # noqa: E402

from peft_persedit.kernels import EditBank, PackedBank, gated_edit_reference, pack_banks  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 576, 1536, 30, 9, 3
HEAD_DIM = HIDDEN // HEADS
BATCHES = ((1, 64), (8, 128))
CLUSTERS = (0, 10, 1000)
FIRE_EVERY = 16  # one token in FIRE_EVERY sits on a key of the bank


class Mlp(nn.Module):
    """LlamaMLP: W_down (silu(W_gate x) ⊙ W_up x); ``edit`` adds the gated edit on the down_proj input."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.down_proj = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x: torch.Tensor, bank: PackedBank | None = None) -> torch.Tensor:
        h = self.inner(x)
        y = self.down_proj(h)
        if bank is None:
            return y
        return y + gated_edit_reference(h.reshape(-1, INTERMEDIATE), bank).reshape(y.shape)


class Attention(nn.Module):
    """Llama attention matmuls with grouped KV heads (no rotary embedding, no cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape

        def heads(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.view(batch, seq, n, HEAD_DIM).transpose(1, 2)

        q = heads(self.q_proj(x), HEADS)
        k = heads(self.k_proj(x), KV_HEADS).repeat_interleave(HEADS // KV_HEADS, dim=1)
        v = heads(self.v_proj(x), KV_HEADS).repeat_interleave(HEADS // KV_HEADS, dim=1)
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, HIDDEN))


def make_edit_bank(num_clusters: int, center: torch.Tensor, hits: torch.Tensor, seed: int = 0) -> EditBank:
    """``num_clusters`` clusters (1 key, rank 1..3 each, τ = 0.6); the first keys are ``hits`` − μ (they fire)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(num_clusters, INTERMEDIATE, generator=g)
    hits = hits[:num_clusters].float().cpu() - center.float().cpu()
    keys[: hits.shape[0]] = hits
    ranks = torch.randint(1, 4, (num_clusters,), generator=g)
    rank = int(ranks.sum())
    return EditBank(
        keys=nn.functional.normalize(keys, dim=-1), key_cluster=torch.arange(num_clusters),
        tau=torch.full((num_clusters,), 0.6), A=torch.randn(rank, INTERMEDIATE, generator=g) * 0.02,
        B=torch.randn(HIDDEN, rank, generator=g) * 0.02,
        rank_cluster=torch.arange(num_clusters).repeat_interleave(ranks),
        shift=torch.randn(num_clusters, HIDDEN, generator=g) * 0.02, center=center.float().cpu(),
    )


def make_bank(num_clusters: int, h: torch.Tensor, seed: int = 0) -> PackedBank:
    """One adapter's bank for activations ``h`` [T, 1536]: every ``FIRE_EVERY``-th row of ``h`` is a key."""
    return pack_banks([make_edit_bank(num_clusters, h.mean(0), h[::FIRE_EVERY], seed)])


def time_interleaved(variants: dict[str, Callable[[], object]], repeats: int,
                     budget_s: float = 0.02) -> dict[str, float]:
    """Median seconds per call of each variant; every repeat runs all variants in turn (order rotated)."""
    inner = {}
    for name, fn in variants.items():  # warm up and pick calls per sample so a sample lasts ≈ budget_s
        fn()
        start = time.perf_counter()
        fn()
        inner[name] = max(1, int(budget_s / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(inner[name]):
                variants[name]()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def fired_fraction(h: torch.Tensor, bank: PackedBank) -> float:
    return float(gated_edit_reference(h, bank).abs().sum(1).ne(0).float().mean())


@torch.inference_mode()
def bench_batch(mlp: Mlp, attention: Attention, batch: int, seq: int, repeats: int) -> None:
    """Time MLP, layer and MLP + edit for each bank size on one [batch, seq] input; print one row each."""
    x = torch.randn(batch, seq, HIDDEN)
    h = mlp.inner(x).reshape(-1, INTERMEDIATE)
    banks = {c: make_bank(c, h) for c in CLUSTERS}
    variants: dict[str, Callable[[], object]] = {"MLP": lambda: mlp(x), "layer": lambda: attention(x) + mlp(x)}
    for c, bank in banks.items():
        variants[f"MLP+edit C={c}"] = lambda bank=bank: mlp(x, bank)
    times = time_interleaved(variants, repeats)
    base, decoder = times["MLP"], LAYERS * times["layer"]
    for name, t in times.items():
        row = f"{batch}×{seq:<5} {name:>15} {1e3 * t:9.3f} {t / base:7.3f}"
        if "=" in name:
            edit, bank = t - base, banks[int(name.split("=")[1])]
            row += f" {1e3 * edit:8.3f} {fired_fraction(h, bank):6.3f} {100 * edit / decoder:16.2f}%"
        print(row)
    print(f"{'':>7} 30-layer decoder ≈ 30 × layer = {1e3 * decoder:.1f} ms\n")


def run(repeats: int) -> None:
    torch.manual_seed(0)
    mlp, attention = Mlp().eval(), Attention().eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, repeats={repeats} (median)")
    print("shapes: SmolLM2-135M (hidden 576, intermediate 1536, 30 layers); edit on down_proj (1536 → 576)\n")
    columns = (("batch", 7), ("variant", 15), ("ms", 9), ("× MLP", 7), ("edit ms", 8), ("fired", 6),
               ("decoder overhead", 17))
    header = " ".join(f"{name:>{width}}" for name, width in columns)
    print(header + "\n" + "-" * len(header))
    for batch, seq in BATCHES:
        bench_batch(mlp, attention, batch, seq, repeats)
    print("target: ≤ 5% decoder overhead at C=1000 on CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.repeats)


if __name__ == "__main__":
    main()
