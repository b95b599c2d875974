"""Cases shared by the interpreter (CPU) and compiled (CUDA) tests of ``gated_edit_triton``.

Each case builds (x [T, d_in], PackedBank, adapter_index) on CPU from a fixed seed; ``check_case`` moves it to a
device and compares the kernel with ``gated_edit_reference`` (the oracle). Centres μ are dyadic (k/8), so
μ + 2·e_j − μ = 2·e_j exactly in every dtype: the boundary case hits cos = τ exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch

from peft_persedit.kernels import EditBank, PackedBank, cluster_scores, gate_values, gated_edit, pack_banks
from peft_persedit.kernels import gated_edit_reference as reference

D_IN, D_OUT = 32, 24
TOLERANCES = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 1.6e-2},
}
Inputs = tuple[torch.Tensor, PackedBank, torch.Tensor | None]


def make_bank(num_clusters: int, *, seed: int, tau: float = 0.7, gate: str = "hard", keys_per: int = 2,
              max_rank: int = 3, keyless: bool = False, temperature: float = 0.05) -> EditBank:
    """Random bank: 1..keys_per unit keys and 0..max_rank rank rows per cluster, dyadic μ ≠ 0, Δ of order 1."""
    g = torch.Generator().manual_seed(seed)
    n_keys = torch.randint(1, keys_per + 1, (num_clusters,), generator=g) * (0 if keyless else 1)
    n_rank = torch.randint(0, max_rank + 1, (num_clusters,), generator=g)
    rank = int(n_rank.sum())
    return EditBank(
        keys=torch.nn.functional.normalize(torch.randn(int(n_keys.sum()), D_IN, generator=g), dim=-1),
        key_cluster=torch.arange(num_clusters).repeat_interleave(n_keys),
        tau=torch.full((num_clusters,), tau),
        A=torch.randn(rank, D_IN, generator=g) / math.sqrt(D_IN),
        B=torch.randn(D_OUT, rank, generator=g) / math.sqrt(max(max_rank, 1)),
        rank_cluster=torch.arange(num_clusters).repeat_interleave(n_rank),
        shift=torch.randn(num_clusters, D_OUT, generator=g) * 0.5,
        center=torch.randint(-8, 9, (D_IN,), generator=g).float() / 8,
        gate=gate, temperature=temperature,
    )


def make_tokens(banks: list[EditBank], adapter_index: torch.Tensor, *, seed: int, hit_every: int = 3) -> torch.Tensor:
    """Rows near their adapter's μ; every ``hit_every``-th row of a keyed adapter sits near one of its keys."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t, a in enumerate(adapter_index.tolist()):
        bank = banks[max(a, 0)]
        row = bank.center + 0.5 * torch.randn(D_IN, generator=g)
        if a >= 0 and bank.keys.shape[0] and t % hit_every == 0:
            key = bank.keys[int(torch.randint(bank.keys.shape[0], (1,), generator=g))]
            row = bank.center + 2 * (key + 0.1 * torch.randn(D_IN, generator=g))
        rows.append(row)
    return torch.stack(rows) if rows else torch.zeros(0, D_IN)


def shuffled(bank: EditBank, seed: int) -> EditBank:
    """The same bank with its key rows and rank rows in random order (not grouped by cluster)."""
    g = torch.Generator().manual_seed(seed)
    keys, ranks = torch.randperm(bank.keys.shape[0], generator=g), torch.randperm(bank.A.shape[0], generator=g)
    return replace(bank, keys=bank.keys[keys], key_cluster=bank.key_cluster[keys], A=bank.A[ranks],
                   B=bank.B[:, ranks], rank_cluster=bank.rank_cluster[ranks])


@dataclass
class Case:
    """Banks (one per adapter), adapter_index (``None`` = adapter 0 everywhere) and the expected firing."""

    banks: list[EditBank]
    adapter_index: list[int] | None
    num_tokens: int = 0
    fired: str = "some"  # "some" | "none" | "all": rows with a ≥ 0 whose reference Δ ≠ 0
    exact_zeros: bool = True  # rows that do not fire are exactly 0 (not for soft gates: σ underflows differently)
    x_dtype_only: bool = False  # keep the bank in fp32 and cast only x

    def build(self, dtype: torch.dtype, seed: int = 0) -> Inputs:
        index = torch.tensor(self.adapter_index if self.adapter_index is not None else [0] * self.num_tokens)
        x = make_tokens(self.banks, index, seed=seed).to(dtype)
        packed = pack_banks(self.banks, dtype=torch.float32 if self.x_dtype_only else dtype)
        return x, packed, (index if self.adapter_index is not None else None)


def _mixed_index(num_tokens: int, num_adapters: int) -> list[int]:
    return [(t % (num_adapters + 1)) - 1 for t in range(num_tokens)]  # −1, 0, 1, …: base rows included


CASES: dict[str, Callable[[], Case]] = {
    "ten_clusters": lambda: Case([make_bank(10, seed=1)], [0] * 37),
    "one_cluster": lambda: Case([make_bank(1, seed=2, keys_per=1, max_rank=1)], [0] * 20),
    "thousand_clusters": lambda: Case([make_bank(1000, seed=3, keys_per=1, tau=0.8)], [0] * 40),
    "no_cluster_fires": lambda: Case([make_bank(10, seed=4, tau=1.5)], [0] * 17, fired="none"),
    "all_fire": lambda: Case([make_bank(6, seed=5, tau=-2.0)], [0] * 19, fired="all"),
    "keyless_always_on": lambda: Case([make_bank(4, seed=6, tau=-math.inf, keyless=True, gate="soft")], [0] * 9,
                                      fired="all"),
    "soft_gate": lambda: Case([make_bank(6, seed=7, gate="soft", tau=0.5)], [0] * 21, fired="all", exact_zeros=False),
    "ungated": lambda: Case([make_bank(5, seed=8, gate="none")], [0] * 13, fired="all"),
    "mixed_adapters": lambda: Case([make_bank(7, seed=9), make_bank(4, seed=10, gate="soft"),
                                    make_bank(3, seed=11, gate="none")], _mixed_index(37, 3), exact_zeros=False),
    "empty_bank": lambda: Case([make_bank(0, seed=12)], [0] * 8, fired="none"),
    "empty_adapter_packed": lambda: Case([make_bank(5, seed=13), make_bank(0, seed=14), make_bank(3, seed=15)],
                                         _mixed_index(23, 3)),
    "base_rows_only": lambda: Case([make_bank(5, seed=16)], [-1] * 11, fired="none"),
    "unsorted_rows": lambda: Case([shuffled(make_bank(9, seed=17, keys_per=3), seed=18)], [0] * 33),
    "index_none": lambda: Case([make_bank(8, seed=19)], None, num_tokens=18),
    "shift_only": lambda: Case([make_bank(6, seed=22, max_rank=0)], [0] * 15),
    "wide_rank": lambda: Case([make_bank(4, seed=23, max_rank=20)], [0] * 15),
    "bank_fp32_x_low": lambda: Case([make_bank(8, seed=20)], [0] * 18, x_dtype_only=True),
}
LOW_PRECISION_CASES = ("ten_clusters", "thousand_clusters", "mixed_adapters", "bank_fp32_x_low")
DTYPE_CASES = [(name, torch.float32) for name in CASES] + [
    (name, dtype) for name in LOW_PRECISION_CASES for dtype in (torch.float16, torch.bfloat16)]


def to_device(inputs: Inputs, device: str) -> Inputs:
    x, bank, index = inputs
    moved = PackedBank(**{f: getattr(bank, f).to(device) for f in bank.__dataclass_fields__})
    return x.to(device), moved, None if index is None else index.to(device)


def assert_matches(x: torch.Tensor, bank: PackedBank, index: torch.Tensor | None, exact_zeros: bool = True) -> None:
    """``gated_edit_triton`` equals the reference (dtype, values; rows that do not fire are exactly 0)."""
    from peft_persedit.kernels.triton_gated_edit import gated_edit_triton

    expected, got = reference(x, bank, index), gated_edit_triton(x, bank, index)
    assert got.dtype == x.dtype and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), **TOLERANCES[x.dtype])
    if exact_zeros:
        assert torch.equal(got.float().abs().sum(1) == 0, expected.float().abs().sum(1) == 0)


def check_case(name: str, dtype: torch.dtype, device: str) -> None:
    case = CASES[name]()
    x, bank, index = to_device(case.build(dtype), device)
    own = (index if index is not None else torch.zeros(x.shape[0], device=device)) >= 0
    fired = reference(x, bank, index).float().abs().sum(1).ne(0)[own]
    expectation = {"none": not fired.any(), "all": fired.all(), "some": fired.any() and not fired.all()}
    assert expectation[case.fired], f"case {name} is not a '{case.fired}' case (fired rows: {fired.tolist()})"
    assert_matches(x, bank, index, case.exact_zeros)


def _next_up(value: float) -> float:
    """The next fp32 above fp32(value)."""
    return torch.nextafter(torch.tensor(value), torch.tensor(math.inf)).item()


def boundary_inputs(dtype: torch.dtype) -> tuple[Inputs, torch.Tensor]:
    """Keys e_0..e_4, rows μ + 2e_0, μ + 2e_1, μ + 3e_2 + 4e_4, μ + 4e_3 + 3e_4 (cos = 1, 1, 0.6 | 0.8, 0.8 | 0.6).

    τ = (1, 1⁺, fl(0.6), fl(0.8), fl(0.8)⁺) with ⁺ the next float up: exactly the scores, or one ulp above them.
    Returns the inputs and the expected hard gates [4, 5].
    """
    bank = make_bank(5, seed=21, keys_per=1, max_rank=2)
    eye = torch.eye(D_IN)
    bank = replace(bank, keys=eye[:5], key_cluster=torch.arange(5),
                   tau=torch.tensor([1.0, _next_up(1.0), 0.6, 0.8, _next_up(0.8)]))
    centred = torch.stack([2 * eye[0], 2 * eye[1], 3 * eye[2] + 4 * eye[4], 4 * eye[3] + 3 * eye[4]])
    x = (bank.center + centred).to(dtype)
    expected = torch.tensor([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.float32)
    return (x, pack_banks([bank], dtype=dtype), torch.zeros(4, dtype=torch.long)), expected


def check_boundary(dtype: torch.dtype, device: str) -> None:
    """cos = τ exactly fires the hard gate, τ one ulp above the score does not; the kernel agrees."""
    inputs, expected = boundary_inputs(dtype)
    x, bank, index = to_device(inputs, device)
    gates = gate_values(cluster_scores(x, bank, index), bank, index)
    assert torch.equal(gates.cpu(), expected), "the reference does not see the constructed boundary scores"
    assert_matches(x, bank, index)
    # each fired row carries exactly its cluster's B_c A_c x + shift_c, so a wrong gate changes Δ by O(1)
    assert reference(x, bank, index).float().abs().sum(1).ne(0).tolist() == [True, False, True, True]


def check_dispatch(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``gated_edit(backend="triton")`` runs the kernel; with gradients needed it falls back to the reference."""
    from peft_persedit.kernels import triton_gated_edit

    calls = []
    kernel = triton_gated_edit.gated_edit_triton
    monkeypatch.setattr(triton_gated_edit, "gated_edit_triton", lambda *a: calls.append(1) or kernel(*a))
    x, bank, index = to_device(CASES["ten_clusters"]().build(torch.float32), device)
    expected = reference(x, bank, index)
    torch.testing.assert_close(gated_edit(x, bank, index, backend="triton"), expected, **TOLERANCES[x.dtype])
    assert len(calls) == 1
    monkeypatch.setenv("PERSEDIT_KERNEL", "triton")
    gated_edit(x, bank, index)
    assert len(calls) == 2
    out = gated_edit(x.clone().requires_grad_(True), bank, index, backend="triton")
    assert len(calls) == 2 and out.requires_grad
    torch.testing.assert_close(out.detach(), expected)
    with torch.no_grad():  # no gradients wanted: the kernel serves it again
        gated_edit(x.clone().requires_grad_(True), bank, index, backend="triton")
    assert len(calls) == 3
    monkeypatch.setenv("PERSEDIT_KERNEL", "reference")
    gated_edit(x, bank, index)
    assert len(calls) == 3


def check_op(device: str) -> None:
    """The custom op ``persedit::gated_edit`` running the kernel passes ``torch.library.opcheck`` (schema, fake)."""
    from peft_persedit.kernels import gated_edit_op
    from peft_persedit.kernels.op import BANK_FIELDS

    for name in ("mixed_adapters", "unsorted_rows"):
        x, bank, index = to_device(CASES[name]().build(torch.float32), device)
        index = torch.zeros(x.shape[0], dtype=torch.long, device=device) if index is None else index
        meta = bank.kernel_meta
        args = (x, index, [getattr(bank, f) for f in BANK_FIELDS], meta.tensors, meta.sizes, True)
        torch.testing.assert_close(gated_edit_op(*args), reference(x, bank, index), **TOLERANCES[x.dtype])
        torch.library.opcheck(gated_edit_op, args)


def device_tests(device: str) -> dict[str, Callable[..., None]]:
    """The comparisons every kernel backend runs, bound to ``device``: test functions for a test module
    (``globals().update(device_tests("cpu"))``), so the interpreter and the CUDA suites stay the same suite."""

    @pytest.mark.parametrize("name,dtype", DTYPE_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in DTYPE_CASES])
    def test_matches_reference(name: str, dtype: torch.dtype) -> None:
        check_case(name, dtype, device)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_threshold_boundary(dtype: torch.dtype) -> None:
        check_boundary(dtype, device)

    def test_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
        check_dispatch(device, monkeypatch)

    def test_custom_op() -> None:
        check_op(device)

    return {test.__name__: test for test in (test_matches_reference, test_threshold_boundary, test_dispatch,
                                             test_custom_op)}
