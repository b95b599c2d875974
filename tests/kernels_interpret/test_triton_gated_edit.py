"""``gated_edit_triton`` under ``TRITON_INTERPRET=1`` on CPU tensors against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from kernel_cases import CASES, DTYPE_CASES, check_boundary, check_case, check_dispatch, check_op  # noqa: E402

from peft_persedit.kernels import triton_gated_edit  # noqa: E402

if not triton_gated_edit.INTERPRETED:
    pytest.skip("kernels were compiled, not interpreted: run `TRITON_INTERPRET=1 python -m pytest "
                "tests/kernels_interpret` in its own process", allow_module_level=True)

pytestmark = [
    pytest.mark.triton_interpret,
    # numpy warns on −∞ − (−∞) (τ = −∞ gates, overridden to 1) and exp overflow (σ → 0), both by design
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


@pytest.mark.parametrize("name,dtype", DTYPE_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in DTYPE_CASES])
def test_matches_reference(name: str, dtype: torch.dtype) -> None:
    check_case(name, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_threshold_boundary(dtype: torch.dtype) -> None:
    check_boundary(dtype, "cpu")


def test_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    check_dispatch("cpu", monkeypatch)


def test_custom_op() -> None:
    check_op("cpu")


def test_empty_batch() -> None:
    x, bank, _ = CASES["ten_clusters"]().build(torch.float32)
    out = triton_gated_edit.gated_edit_triton(x[:0], bank, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, bank.shift.shape[1])
