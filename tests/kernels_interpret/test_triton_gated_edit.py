"""``gated_edit_triton`` under ``TRITON_INTERPRET=1`` on CPU tensors against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from kernel_cases import CASES, device_tests  # noqa: E402

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


globals().update(device_tests("cpu"))


def test_empty_batch() -> None:
    x, bank, _ = CASES["ten_clusters"]().build(torch.float32)
    out = triton_gated_edit.gated_edit_triton(x[:0], bank, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, bank.shift.shape[1])
