"""Checks of one layer's bank tensors about to be loaded: shapes against the layer and each other, cluster
indices in range, finite values. Errors name the tensor; :mod:`.validation` adds the file."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME

#: per bank tensor, the size each dimension must have: K keys, C clusters, R rank rows, in/out the layer dims
LAYOUT: dict[str, tuple[str, ...]] = {
    "A": ("R", "in"), "keys": ("K", "in"), "center": ("in",), "B": ("out", "R"), "shift": ("C", "out"),
    "key_cluster": ("K",), "rank_cluster": ("R",), "tau": ("C",),
}
_INDEX = ("key_cluster", "rank_cluster")


class AdapterWeightsError(ValueError):
    """A loaded bank tensor is malformed; ``file`` is the adapter file the message is about."""

    def __init__(self, message: str, file: str = SAFETENSORS_WEIGHTS_NAME) -> None:
        super().__init__(message)
        self.file = file


def _check_shape(key: str, name: str, tensor: torch.Tensor, sizes: Mapping[str, int]) -> None:
    expected = tuple(sizes[s] for s in LAYOUT[name])
    shape = tuple(tensor.shape)
    if shape == expected:
        return
    layer_dims = [i for i, s in enumerate(LAYOUT[name]) if s in ("in", "out")]
    if len(shape) == len(expected) and any(shape[i] != expected[i] for i in layer_dims):
        raise AdapterWeightsError(
            f"size mismatch for {key}: the checkpoint's tensor has shape {shape}, but this model's layer has "
            f"d_in={sizes['in']}, d_out={sizes['out']} (was the adapter made for another base model?)")
    raise AdapterWeightsError(
        f"{key}: shape {shape} is inconsistent with the rest of the bank (expected {expected} for "
        f"{sizes['K']} keys, {sizes['C']} clusters, rank {sizes['R']}); the file is corrupted")


def _check_values(key: str, name: str, tensor: torch.Tensor, clusters: int) -> None:
    if tensor.device.type == "meta":
        return
    if name in _INDEX:
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            raise AdapterWeightsError(f"{key}: cluster indices must be integers, got dtype {tensor.dtype}")
        if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= clusters):
            bad = int(tensor[(tensor < 0) | (tensor >= clusters)][0])
            raise AdapterWeightsError(
                f"{key}: cluster index {bad} out of range for a bank of {clusters} clusters (valid: 0..{clusters - 1});"
                " the file is corrupted")
        return
    if not tensor.dtype.is_floating_point:
        raise AdapterWeightsError(f"{key}: expected a floating-point tensor, got dtype {tensor.dtype}")
    bad = torch.isnan(tensor) if name == "tau" else ~torch.isfinite(tensor)  # τ = ±inf: always / never fires
    if bool(bad.any()):
        what = "NaN" if name == "tau" else "NaN or infinite"
        raise AdapterWeightsError(f"{key}: {int(bad.sum())} of {tensor.numel()} values are {what}")


def check_state_dict_bank(tensors: Mapping[str, torch.Tensor], sizes: Mapping[str, int],
                          key_of: Mapping[str, str]) -> None:
    """Check one adapter's bank tensors about to be loaded into one layer.

    ``tensors``: bank tensor name (``A``, ``keys``, …) → tensor (only those present); ``sizes``: ``K``, ``C``,
    ``R``, ``in``, ``out``; ``key_of``: name → state-dict key used in messages.
    """
    for name, tensor in tensors.items():
        _check_shape(key_of[name], name, tensor, sizes)
    for name, tensor in tensors.items():
        _check_values(key_of[name], name, tensor, sizes["C"])


def resize_banks_before_load(module: Any, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook of a PERSEDIT layer: check each adapter's saved bank, then size the bank to it
    (0 … many clusters)."""
    for adapter in list(module.persedit_A.keys()):
        a_key, keys_key, tau_key = (f"{prefix}persedit_{n}.{adapter}" for n in ("A", "keys", "tau"))
        if a_key not in state_dict and tau_key not in state_dict:
            continue
        rank = state_dict[a_key].shape[0] if a_key in state_dict else module.persedit_A[adapter].shape[0]
        num_keys = state_dict[keys_key].shape[0] if keys_key in state_dict else module.num_keys(adapter)
        num_clusters = state_dict[tau_key].shape[0] if tau_key in state_dict else module.num_clusters(adapter)
        key_of = {name: f"{prefix}persedit_{name}.{adapter}" for name in LAYOUT}
        check_state_dict_bank(  # shapes, indices and finiteness, before anything is copied in
            {name: state_dict[key] for name, key in key_of.items() if key in state_dict},
            {"K": num_keys, "C": num_clusters, "R": rank, "in": module.in_features, "out": module.out_features},
            key_of)
        if [num_keys, num_clusters, rank] != [module.num_keys(adapter), module.num_clusters(adapter),
                                              module.persedit_A[adapter].shape[0]]:
            module.resize_bank(adapter, num_keys, num_clusters, rank)
