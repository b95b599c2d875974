"""Checks of loaded PERSEDIT banks: shapes, cluster indices and finiteness, with errors naming file and tensor.

A corrupted ``adapter_model.safetensors`` (bytes flipped, header intact) would otherwise load and fail at the
first forward deep in the kernels (``IndexError: index -72057594037927681 is out of bounds``), and NaN weights
would load silently. :func:`check_state_dict_bank` runs in the layer's load-state-dict pre-hook, before any
tensor is copied in. :func:`install` makes ``PeftModel.load_adapter`` (hence ``PeftModel.from_pretrained``)
and transformers' ``model.load_adapter`` check the loaded banks (transformers 5 copies tensors without
``load_state_dict``) and their ``bank_sizes``, name the file in errors and remove an adapter they could not load.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

_MARK = "__persedit_wrapped__"
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


def check_loaded_adapter(model: Any, adapter: str) -> None:
    """Check every loaded bank of ``adapter`` in ``model`` (a ``PeftModel`` or a transformers model carrying
    adapters), and that its sizes are the ``bank_sizes`` of the adapter's config."""
    from .config import PersonalizationEditConfig, saved_bank_sizes
    from .layer import PersEditLayer

    config = getattr(model, "peft_config", {}).get(adapter)
    if not isinstance(config, PersonalizationEditConfig):
        return
    saved = saved_bank_sizes(config)
    for name, module in model.named_modules():
        if not (isinstance(module, PersEditLayer) and adapter in module.persedit_A):
            continue
        tensors = {n: module._tensor(n, adapter) for n in LAYOUT}
        live = [module.num_keys(adapter), module.num_clusters(adapter), int(tensors["A"].shape[0])]
        sizes = {"K": live[0], "C": live[1], "R": live[2], "in": module.in_features, "out": module.out_features}
        check_state_dict_bank(tensors, sizes, {n: f"{name}.persedit_{n}.{adapter}" for n in LAYOUT})
        if module.persedit_key in saved and list(saved[module.persedit_key]) != live:
            raise AdapterWeightsError(
                f"bank_sizes[{module.persedit_key!r}] is {list(saved[module.persedit_key])} [keys, clusters, "
                f"rank], but {SAFETENSORS_WEIGHTS_NAME} holds {live}: the two files do not belong together",
                file=CONFIG_NAME)


def adapter_file(model_id: str | os.PathLike, name: str, subfolder: str | None = None) -> str:
    """Path of ``name`` in a local adapter folder (the ``.bin`` weights when only those exist), else
    ``repo_id/name``."""
    folder = os.path.join(os.fspath(model_id), subfolder or "")
    if name == SAFETENSORS_WEIGHTS_NAME and not os.path.isfile(os.path.join(folder, name)) and os.path.isfile(
            os.path.join(folder, WEIGHTS_NAME)):
        name = WEIGHTS_NAME
    return os.path.join(folder, name)


def _discard(model: Any, adapter: str, keep_last: bool) -> None:
    """Leave no half-loaded ``adapter`` behind: empty its banks, then delete it where the loader allows."""
    from .layer import PersEditLayer

    for module in model.modules():
        if isinstance(module, PersEditLayer) and adapter in module.persedit_A:
            module.resize_bank(adapter, 0, 0, 0)
    configs = getattr(model, "peft_config", None) or {}
    if adapter in configs and (len(configs) > 1 or not keep_last):
        try:
            model.delete_adapter(adapter)
        except ValueError:  # transformers 5 deletes adapters only with peft >= 0.22; the bank stays empty
            pass


def _named_load_errors(method: Any, id_param: str, keep_last: bool) -> Any:
    """Wrap a ``load_adapter(model_id/peft_model_id, adapter_name, ...)``: check the loaded banks, name the file
    in errors and remove the adapter it could not load (peft keeps a model's last adapter)."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def load_adapter(self: Any, *args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind(self, *args, **kwargs).arguments
        adapter = arguments.get("adapter_name") or "default"
        new = adapter not in (getattr(self, "peft_config", None) or {})
        try:
            result = method(self, *args, **kwargs)
            check_loaded_adapter(self, adapter)
        except AdapterWeightsError as err:
            if new:
                _discard(self, adapter, keep_last)
            source = arguments.get(id_param)
            where = adapter_file(source, err.file, arguments.get("subfolder")) if source is not None else "adapter"
            raise AdapterWeightsError(f"{where}: {err}", err.file) from None
        return result

    setattr(load_adapter, _MARK, True)
    return load_adapter


def install() -> None:
    """Wrap ``load_adapter`` of ``PeftModel`` and of transformers models (idempotent) so that loaded banks are
    checked, errors name the file, and a failed load leaves nothing half-loaded."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    for cls, id_param, keep_last in ((PeftModel, "model_id", True), (PreTrainedModel, "peft_model_id", False)):
        if not getattr(cls.load_adapter, _MARK, False):
            cls.load_adapter = _named_load_errors(cls.load_adapter, id_param, keep_last)
