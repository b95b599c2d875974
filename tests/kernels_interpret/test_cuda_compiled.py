"""The same comparisons with compiled kernels on CUDA tensors (skipped without CUDA or under the interpreter).

Run on a GPU machine: ``TRITON_INTERPRET=0 python -m pytest tests/kernels_interpret``.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1: compiled kernels are tested with TRITON_INTERPRET=0", allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from kernel_cases import CASES, device_tests, to_device  # noqa: E402

from peft_persedit.kernels import gated_edit  # noqa: E402

globals().update(device_tests("cuda"))


def test_auto_backend_uses_triton_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft_persedit.kernels import triton_gated_edit

    calls = []
    kernel = triton_gated_edit.gated_edit_triton
    monkeypatch.setattr(triton_gated_edit, "gated_edit_triton", lambda *a: calls.append(1) or kernel(*a))
    monkeypatch.delenv("PERSEDIT_KERNEL", raising=False)
    x, bank, index = to_device(CASES["one_cluster"]().build(torch.float32), "cuda")
    gated_edit(x, bank, index)
    assert calls == [1]
