"""PersEditModel: the peft tuner that injects :class:`PersEditLinear` edit modules into a transformers model."""

from __future__ import annotations

import copy
import itertools
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import TARGET_MODULES_BY_MODEL_TYPE, PersonalizationEditConfig, default_layers, saved_bank_sizes
from .layer import PersEditLayer, PersEditLinear
from .peft_type import BASE_ADAPTER


def num_hidden_layers(model_config: dict) -> int | None:
    """Number of decoder blocks from a transformers config dict (``num_hidden_layers`` / ``n_layer``)."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(model_config.get(key), int):
            return model_config[key]
    text_config = model_config.get("text_config")
    return num_hidden_layers(text_config) if isinstance(text_config, dict) else None


_TUNER_TAGS = itertools.count()


def _check_target_types(model: nn.Module, config: PersonalizationEditConfig) -> None:
    """Name the first module matching explicit ``target_modules`` that is not ``nn.Linear``/``Conv1D``.

    Checked before peft filters by layer, so that e.g. an embedding is reported as the wrong type rather than
    as "not found in layers_to_transform".
    """
    targets = config.target_modules
    if not isinstance(targets, (list, set, tuple)):
        return  # default targets are projections; for a regex the layer constructor names a wrong type
    for name, module in model.named_modules():
        if any(name == t or name.endswith(f".{t}") for t in targets) and not isinstance(
            module, (nn.Linear, Conv1D, BaseTunerLayer)
        ):
            raise TypeError(
                f"cannot wrap {name!r}: PERSEDIT can only wrap nn.Linear or transformers Conv1D layers, got "
                f"{type(module).__name__}; pick the MLP output projection with target_modules"
            )


def _adapter_names_pre_forward_hook(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class PersEditModel(BaseTuner):
    """Personalization edits as a PEFT adapter (peft type ``PERSEDIT``).

    Each targeted MLP output projection becomes a :class:`PersEditLinear` holding, per adapter, a bank
    of gated low-rank cluster edits; see :class:`PersonalizationEditConfig`. Use
    :class:`peft_persedit.PersonalizationEditor` to fill the banks from preferences.
    """

    prefix: str = "persedit_"
    tuner_layer_cls = PersEditLayer
    target_module_mapping = TARGET_MODULES_BY_MODEL_TYPE

    def _prepare_adapter_config(self, peft_config: PersonalizationEditConfig, model_config: dict):
        model_type = model_config.get("model_type")
        if peft_config.target_modules is None:
            if model_type not in self.target_module_mapping:
                raise ValueError(
                    f"PERSEDIT has no default target for architecture {model_type!r}; pass "
                    "target_modules=[...] naming the MLP output projection (e.g. 'mlp.down_proj'). "
                    f"Known architectures: {sorted(self.target_module_mapping)}"
                )
            peft_config.target_modules = list(self.target_module_mapping[model_type])
        n_layers = num_hidden_layers(model_config)
        if peft_config.layers_to_transform is None and n_layers and isinstance(peft_config.target_modules, list):
            peft_config.layers_to_transform = default_layers(n_layers)
        if n_layers and peft_config.layers_to_transform:
            bad = [i for i in peft_config.layers_to_transform if not 0 <= i < n_layers]
            if bad:
                raise ValueError(
                    f"layers_to_transform {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        return peft_config

    def _create_and_replace(self, persedit_config: PersonalizationEditConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **optional_kwargs: Any) -> None:
        if isinstance(target, PersEditLayer):
            target.update_layer(adapter_name, persedit_config)
            return
        try:
            new_module = PersEditLinear(target, adapter_name, config=persedit_config, current_key=current_key)
        except TypeError as err:
            raise TypeError(f"cannot wrap {current_key!r}: {err}") from None
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """peft's injection, with a config of this adapter's own and target types checked first.

        A config object already serving another adapter (of this or another model) is copied: its
        ``bank_sizes`` track one adapter's live banks, which are then saved with it.
        """
        config = self.peft_config[adapter_name]
        tag = self.__dict__.setdefault("_persedit_tag", next(_TUNER_TAGS))
        shared = any(c is config for name, c in self.peft_config.items() if name != adapter_name)
        if shared or getattr(config, "_persedit_owner", (tag, adapter_name)) != (tag, adapter_name):
            config = self.peft_config[adapter_name] = copy.deepcopy(config)
        config._persedit_owner = (tag, adapter_name)
        config.bank_sizes = {key: list(sizes) for key, sizes in saved_bank_sizes(config).items()}
        _check_target_types(model, config)
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for module in model.modules():
            if isinstance(module, PersEditLayer):
                module.freeze_untrainable()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """The wrapped model's gradient checkpointing; with reentrant checkpointing (transformers 4's default)
        the input embeddings' output is made to require grad, as transformers does for its own peft
        integration, else no gradient would reach the adapter tensors inside checkpointed blocks."""
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)
        if (gradient_checkpointing_kwargs or {}).get("use_reentrant", True) and hasattr(
                self.model, "enable_input_require_grads"):
            self.model.enable_input_require_grads()

    def edit_layers(self) -> dict[str, PersEditLinear]:
        """Module name → edit module, in model order."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, PersEditLinear)}

    def loaded_adapters(self) -> list[str]:
        """All adapters that own a bank in at least one layer."""
        return sorted({a for m in self.edit_layers().values() for a in m.persedit_A.keys()})

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        for module in self.edit_layers().values():
            for adapter in module.active_adapters:
                if adapter in module.persedit_A:
                    module._check_mergeable(adapter)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Route batch row i through ``adapter_names[i]`` (``"__base__"`` = no edit, ``"a+b"`` = composition)."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.model.training:  # (the wrapped model's mode: a new tuner module reports training=True)
            raise ValueError("adapter_names (mixed-adapter batches) cannot be used in training mode; call .eval()")
        known = set(self.loaded_adapters())
        unknown = {p for name in adapter_names for p in name.split("+") if p != BASE_ADAPTER} - known
        if unknown:
            raise ValueError(f"adapter_names names unknown adapter(s) {sorted(unknown)}; known: {sorted(known)}")
        handles = [
            module.register_forward_pre_hook(
                partial(_adapter_names_pre_forward_hook, adapter_names=list(adapter_names)), with_kwargs=True)
            for module in self.edit_layers().values()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def bank_summary(self, adapter: str | None = None) -> dict[str, dict[str, int]]:
        """Per edited layer: clusters, keys and total rank of ``adapter`` (default: the active one)."""
        adapter = adapter or self.active_adapters[0]
        return {
            name: {"clusters": m.num_clusters(adapter), "keys": m.num_keys(adapter),
                   "rank": int(m.persedit_A[adapter].shape[0])}
            for name, m in self.edit_layers().items() if adapter in m.persedit_A
        }
