"""Checks of loaded PERSEDIT banks: shapes, cluster indices and finiteness, with errors naming file and tensor.

A corrupted ``adapter_model.safetensors`` (bytes flipped, header intact) would otherwise load and fail at the
first forward deep in the kernels (``IndexError: index -72057594037927681 is out of bounds``), and NaN weights
would load silently. The layer's load-state-dict pre-hook runs :func:`.bank_checks.check_state_dict_bank`
before any tensor is copied in. :func:`install` makes ``PeftModel.load_adapter`` (hence ``PeftModel.from_pretrained``)
and transformers' ``model.load_adapter`` check the loaded banks (transformers 5 copies tensors without
``load_state_dict``) and their ``bank_sizes``, name the file in errors and remove an adapter they could not load.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from .bank_checks import LAYOUT, AdapterWeightsError, check_state_dict_bank
from .config import PersonalizationEditConfig, saved_bank_sizes
from .layer import PersEditLayer
from .patching import wrap_once


def check_loaded_adapter(model: Any, adapter: str) -> None:
    """Check every loaded bank of ``adapter`` in ``model`` (a ``PeftModel`` or a transformers model carrying
    adapters), and that its sizes are the ``bank_sizes`` of the adapter's config."""
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

    return load_adapter


def install() -> None:
    """Wrap ``load_adapter`` of ``PeftModel`` and of transformers models (idempotent) so that loaded banks are
    checked, errors name the file, and a failed load leaves nothing half-loaded."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    for cls, id_param, keep_last in ((PeftModel, "model_id", True), (PreTrainedModel, "peft_model_id", False)):
        wrap_once(cls, "load_adapter", functools.partial(_named_load_errors, id_param=id_param, keep_last=keep_last))
