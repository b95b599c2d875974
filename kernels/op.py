"""``persedit::gated_edit``: the inference gated edit as a torch custom op, so ``torch.compile`` traces models using it.

Custom ops take tensors and scalars, not dataclasses, so the op takes a :class:`.bank.PackedBank`'s fields in
field order and, for the Triton kernel, its :class:`.bank.KernelMeta` flattened (tensors rank_start, rank_count,
A, B; sizes c_max, k_max, r_max; both lists empty for the reference). Its fake (meta) implementation returns
Δ = x.new_empty(T, d_out) with d_out = shift.shape[1]. No autograd: :func:`.dispatch.gated_edit` calls it only when
no gradient is wanted.
"""

import dataclasses

import torch

from .bank import KernelMeta, PackedBank
from .reference import gated_edit_reference

BANK_FIELDS = tuple(f.name for f in dataclasses.fields(PackedBank))
_SHIFT = BANK_FIELDS.index("shift")


@torch.library.custom_op("persedit::gated_edit", mutates_args=())
def gated_edit_op(x: torch.Tensor, adapter_index: torch.Tensor, bank: list[torch.Tensor],
                  meta_tensors: list[torch.Tensor], meta_sizes: list[int], use_triton: bool) -> torch.Tensor:
    """Δ [T, d_out] = Σ_c g_{t,c}(B_c A_c x_t + shift_c): the Triton kernel if ``use_triton``, else the reference."""
    packed = PackedBank(*bank)
    if not use_triton:
        return gated_edit_reference(x, packed, adapter_index)
    from . import triton_gated_edit  # imports triton; looked up per call so tests can wrap the kernel

    return triton_gated_edit.gated_edit_triton(x, packed, adapter_index, KernelMeta(*meta_sizes, *meta_tensors))


@gated_edit_op.register_fake
def _gated_edit_fake(x: torch.Tensor, adapter_index: torch.Tensor, bank: list[torch.Tensor],
                     meta_tensors: list[torch.Tensor], meta_sizes: list[int], use_triton: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], bank[_SHIFT].shape[1])


def gated_edit_inference(x: torch.Tensor, bank: PackedBank, adapter_index: torch.Tensor,
                         use_triton: bool) -> torch.Tensor:
    """Call :func:`gated_edit_op` on ``bank`` (its :attr:`~.bank.PackedBank.kernel_meta` only for Triton)."""
    meta = bank.kernel_meta if use_triton else None
    return gated_edit_op(x, adapter_index, [getattr(bank, name) for name in BANK_FIELDS],
                         meta.tensors if meta else [], meta.sizes if meta else [], use_triton)
