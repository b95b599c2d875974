"""One entry point for applying edit banks: Triton on CUDA, the PyTorch reference elsewhere.

``PERSEDIT_KERNEL=reference|triton|auto`` (default ``auto``) forces a backend. Inference goes through the custom
op ``persedit::gated_edit`` (:mod:`.op`: Triton or reference inside, opaque to ``torch.compile``); whenever autograd
needs gradients the reference runs directly (it is exact and differentiable).
"""

from __future__ import annotations

import os

import torch

from .bank import PackedBank
from .op import gated_edit_inference
from .reference import gated_edit_reference

_BACKENDS = ("auto", "reference", "triton")


def kernel_backend() -> str:
    """The backend requested by ``PERSEDIT_KERNEL`` (validated)."""
    backend = os.environ.get("PERSEDIT_KERNEL", "auto").lower()
    if backend not in _BACKENDS:
        raise ValueError(f"PERSEDIT_KERNEL={backend!r} is not one of {_BACKENDS}")
    return backend


def _wants_grad(x: torch.Tensor, bank: PackedBank) -> bool:
    tensors = (x, bank.keys, bank.tau, bank.A, bank.B, bank.shift, bank.center, bank.temperature)
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def gated_edit(x: torch.Tensor, bank: PackedBank, adapter_index: torch.Tensor | None = None,
               backend: str | None = None) -> torch.Tensor:
    """Δ = Σ_c g_c(x)(B_c A_c x + shift_c) for ``x`` [T, d_in]; row t uses adapter ``adapter_index[t]``."""
    backend = backend or kernel_backend()
    if _wants_grad(x, bank):
        return gated_edit_reference(x, bank, adapter_index)
    if adapter_index is None:
        adapter_index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    adapter_index = adapter_index.to(device=x.device, dtype=torch.long)
    use_triton = backend == "triton" or (backend == "auto" and x.is_cuda)
    return gated_edit_inference(x, bank, adapter_index, use_triton)
