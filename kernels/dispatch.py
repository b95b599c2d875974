"""One entry point for applying edit banks: Triton on CUDA, the PyTorch reference elsewhere.

``PERSEDIT_KERNEL=reference|triton|auto`` (default ``auto``) forces a backend. The Triton path serves
inference only; whenever autograd needs gradients the reference runs (it is exact and differentiable).
"""

from __future__ import annotations

import os

import torch

from .bank import PackedBank
from .reference import gated_edit_reference

_BACKENDS = ("auto", "reference", "triton")


def kernel_backend() -> str:
    """The backend requested by ``PERSEDIT_KERNEL`` (validated)."""
    backend = os.environ.get("PERSEDIT_KERNEL", "auto").lower()
    if backend not in _BACKENDS:
        raise ValueError(f"PERSEDIT_KERNEL={backend!r} is not one of {_BACKENDS}")
    return backend


def _wants_grad(x: torch.Tensor, bank: PackedBank) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or bank.A.requires_grad or bank.B.requires_grad
                                        or bank.keys.requires_grad or bank.shift.requires_grad)


def gated_edit(x: torch.Tensor, bank: PackedBank, adapter_index: torch.Tensor | None = None,
               backend: str | None = None) -> torch.Tensor:
    """Δ = Σ_c g_c(x)(B_c A_c x + shift_c) for ``x`` [T, d_in]; row t uses adapter ``adapter_index[t]``."""
    backend = backend or kernel_backend()
    use_triton = backend == "triton" or (backend == "auto" and x.is_cuda)
    if use_triton and not _wants_grad(x, bank):
        from .triton_gated_edit import gated_edit_triton

        return gated_edit_triton(x, bank, adapter_index)
    return gated_edit_reference(x, bank, adapter_index)
