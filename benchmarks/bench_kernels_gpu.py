"""GPU cost of the gated edit: Triton kernel vs PyTorch reference vs a LoRA of equal rank (SmolLM2-135M down_proj).

    kernel     gated_edit_triton(h, bank)                      h [T, 1536] → Δ [T, 576]
    reference  gated_edit_reference(h, bank)                   (the autograd / oracle path)
    LoRA       B (A h), A: nn.Linear(1536, R), B: nn.Linear(R, 576), R = the bank's total rank (≈ 2 C)

Banks: 1 key and rank 1..3 per cluster; 1 token in 16 fires one cluster. Achieved GB/s counts the bytes the
kernel must move at least once (keys, x, Δ, the gate matrix written and read, fired A/B/shift rows) against the
card's peak (H100 ≈ 3350 GB/s, H200 ≈ 4800 GB/s). Decode: 64 tokens, one per sequence, from 1 adapter vs 64.
Usage (CUDA machine): ``python benchmarks/bench_kernels_gpu.py [--dtype bf16] [--clusters 1000]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels_cpu import FIRE_EVERY, HIDDEN, INTERMEDIATE, make_edit_bank  # noqa: E402

from peft_persedit.kernels import PackedBank, gated_edit_reference, pack_banks  # noqa: E402

PEAK_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0, "L4": 300.0}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICE = "cuda"


def peak_gbps(name: str) -> float | None:
    """Peak memory bandwidth of the card (first matching key of ``PEAK_GBPS`` in its name), else ``None``."""
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def to_device(bank: PackedBank, device: str) -> PackedBank:
    return PackedBank(**{f: getattr(bank, f).to(device) for f in bank.__dataclass_fields__})


def build(num_adapters: int, clusters: int, h: torch.Tensor, dtype: torch.dtype) -> PackedBank:
    """``num_adapters`` banks; token t uses adapter t mod num_adapters and every FIRE_EVERY-th token fires."""
    center = h.float().mean(0)

    def hits(a: int) -> torch.Tensor:  # the rows of h that adapter a's keys sit on
        if num_adapters == 1:
            return h[::FIRE_EVERY]
        return h[a:a + 1] if a % FIRE_EVERY == 0 else h[:0]

    banks = [make_edit_bank(clusters, center, hits(a), seed=a) for a in range(num_adapters)]
    return to_device(pack_banks(banks, dtype=dtype), DEVICE)


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds per call (CUDA events, L2 flushed between calls)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def min_bytes(h: torch.Tensor, bank: PackedBank, delta: torch.Tensor, index: torch.Tensor) -> int:
    """Bytes the kernel must move: keys, μ, x, Δ, gate matrix (write + read) and the fired clusters' A/B/shift rows."""
    from peft_persedit.kernels.reference import cluster_scores, gate_values

    fired = gate_values(cluster_scores(h, bank, index), bank, index).ne(0).any(0)
    rows, clusters = int(fired[bank.rank_cluster].sum()), int(fired.sum())
    bank_elements = bank.keys.numel() + bank.center.numel() + rows * (h.shape[1] + delta.shape[1])
    bank_elements += clusters * delta.shape[1]
    gate_matrix = 2 * 4 * h.shape[0] * int(bank.cluster_offsets.diff().max())
    return bank_elements * bank.keys.element_size() + (h.numel() + delta.numel()) * h.element_size() + gate_matrix


def lora_pair(rank: int, dtype: torch.dtype) -> nn.Sequential:
    """LoRA of rank ``rank`` on down_proj as two linears (what peft runs per LoRA layer)."""
    pair = nn.Sequential(nn.Linear(INTERMEDIATE, rank, bias=False), nn.Linear(rank, HIDDEN, bias=False))
    return pair.to(DEVICE, dtype)


def compare(tokens: int, clusters: int, dtype: torch.dtype, peak: float | None) -> None:
    """One row: kernel, reference and LoRA times for ``tokens`` tokens of one adapter with ``clusters`` clusters."""
    from peft_persedit.kernels.triton_gated_edit import gated_edit_triton

    h = torch.randn(tokens, INTERMEDIATE, device=DEVICE).to(dtype)
    bank = build(1, clusters, h, dtype)
    index = torch.zeros(tokens, dtype=torch.long, device=DEVICE)
    lora = lora_pair(bank.A.shape[0], dtype)
    delta = gated_edit_triton(h, bank, index)
    error = (delta.float() - gated_edit_reference(h, bank, index).float()).abs().max().item()
    with torch.inference_mode():
        t_kernel = bench(lambda: gated_edit_triton(h, bank, index))
        t_ref = bench(lambda: gated_edit_reference(h, bank, index))
        t_lora = bench(lambda: lora(h))
    gbps = min_bytes(h, bank, delta, index) / t_kernel / 1e6
    share = f"{100 * gbps / peak:5.1f}%" if peak else "  n/a"
    print(f"{tokens:>6} {clusters:>6} {bank.A.shape[0]:>6} {1e3 * t_kernel:>10.1f} {1e3 * t_ref:>10.1f} "
          f"{1e3 * t_lora:>9.1f} {t_ref / t_kernel:>8.2f} {t_kernel / t_lora:>8.2f} {gbps:>8.0f} {share:>7} "
          f"{error:.1e}")


def decode(clusters: int, dtype: torch.dtype, batch: int = 64) -> None:
    """Decode step latency: ``batch`` tokens from one adapter vs from ``batch`` different adapters."""
    from peft_persedit.kernels.triton_gated_edit import gated_edit_triton

    h = torch.randn(batch, INTERMEDIATE, device=DEVICE).to(dtype)
    times = {}
    for adapters in (1, batch):
        bank = build(adapters, clusters, h, dtype)
        index = torch.arange(batch, device=DEVICE) % adapters
        with torch.inference_mode():
            times[adapters] = bench(lambda bank=bank, index=index: gated_edit_triton(h, bank, index))
        keys_mb = bank.keys.numel() * bank.keys.element_size() / 2**20
        print(f"decode {batch} tokens, {adapters:>2} adapter(s) × {clusters} clusters ({keys_mb:6.1f} MiB keys): "
              f"{1e3 * times[adapters]:8.1f} µs")
    print(f"decode latency ratio {batch} adapters / 1 adapter: {times[batch] / times[1]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--clusters", type=int, default=1000, help="clusters per adapter in the decode test")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels_gpu: no CUDA device (torch.cuda.is_available() is False); "
                         "run it on a GPU machine, or benchmarks/bench_kernels_cpu.py for the CPU path")
    dtype, name = DTYPES[args.dtype], torch.cuda.get_device_name()
    peak = peak_gbps(name)
    print(f"{name}, peak {peak or 'unknown'} GB/s, {args.dtype}, torch {torch.__version__}\n")
    print(f"{'T':>6} {'C':>6} {'R':>6} {'kernel µs':>10} {'ref µs':>10} {'LoRA µs':>9} {'ref/ker':>8} "
          f"{'ker/LoRA':>8} {'GB/s':>8} {'of peak':>7} max|err|")
    for tokens in (1, 64, 1024, 4096):
        for clusters in (10, 1000):
            compare(tokens, clusters, dtype, peak)
    print()
    decode(args.clusters, dtype)


if __name__ == "__main__":
    main()
