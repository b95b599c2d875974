"""Edit-bank kernels: packed layout, PyTorch reference and Triton implementation behind one dispatch."""

# This folder is installed as ``peft_persedit.kernels``. With the repository root on ``sys.path`` a package probe
# (transformers' ``is_kernels_available``) can import it as a top-level ``kernels``: stay an empty module then, so
# that the custom op is never registered twice and nobody mistakes it for the ``kernels`` library.
if __name__ != "peft_persedit.kernels":
    __all__: list[str] = []
else:
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
