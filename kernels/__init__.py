"""Edit-bank kernels: packed layout, PyTorch reference and Triton implementation behind one dispatch."""

from .bank import GATE_MODES, EditBank, KernelMeta, PackedBank, pack_banks, tensor_version
from .dispatch import gated_edit, kernel_backend
from .op import gated_edit_op
from .reference import cluster_scores, gate_values, gated_edit_reference

__all__ = [
    "GATE_MODES",
    "EditBank",
    "KernelMeta",
    "PackedBank",
    "cluster_scores",
    "gate_values",
    "gated_edit",
    "gated_edit_op",
    "gated_edit_reference",
    "kernel_backend",
    "pack_banks",
    "tensor_version",
]
