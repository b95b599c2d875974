"""Edit-bank kernels: packed layout, PyTorch reference and Triton implementation behind one dispatch."""

from .bank import GATE_MODES, EditBank, PackedBank, pack_banks, single_bank_packed
from .dispatch import gated_edit, kernel_backend
from .reference import cluster_scores, gate_values, gated_edit_reference

__all__ = [
    "GATE_MODES",
    "EditBank",
    "PackedBank",
    "cluster_scores",
    "gate_values",
    "gated_edit",
    "gated_edit_reference",
    "kernel_backend",
    "pack_banks",
    "single_bank_packed",
]
