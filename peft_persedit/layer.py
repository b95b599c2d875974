"""The edit module: a wrapped MLP output projection with one bank of gated, low-rank cluster edits per adapter.

    y = W x + Σ_c g_c(x) · (B_c A_c x + shift_c),    g_c(x) = gate(max_{k∈c} cos(x − μ, K_k) − τ_c)

Every per-adapter tensor lives in a ``ParameterDict`` / ``BufferDict(persistent=True)`` whose name starts
with ``persedit_``, so peft's state-dict machinery saves and loads it; banks grow and shrink by whole
clusters, and a load-state-dict pre-hook resizes a bank to the saved tensors before they are copied in.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .bank_checks import resize_banks_before_load
from .config import PersonalizationEditConfig, saved_bank_sizes
from .kernels import EditBank, PackedBank, gated_edit, pack_banks, tensor_version
from .peft_type import BASE_ADAPTER

_FLOAT_TENSORS = ("keys", "A", "B", "shift")  # ParameterDicts (trainability is a config choice)
_BUFFER_TENSORS = ("tau", "key_cluster", "rank_cluster", "center")
_INDEX_TENSORS = ("key_cluster", "rank_cluster")


class PersEditLayer(BaseTunerLayer):
    """Mixin holding the per-adapter edit banks of one wrapped layer."""

    adapter_layer_names = tuple(f"persedit_{n}" for n in _FLOAT_TENSORS)
    other_param_names = tuple(f"persedit_{n}" for n in _BUFFER_TENSORS)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        for name in _FLOAT_TENSORS:
            setattr(self, f"persedit_{name}", nn.ParameterDict({}))
        for name in _BUFFER_TENSORS:
            setattr(self, f"persedit_{name}", BufferDict({}, persistent=True))
        self.persedit_gate: dict[str, tuple[str, float]] = {}
        self.persedit_trainable: dict[str, tuple[str, ...]] = {}
        self.persedit_grad_on: set[str] = set()  # adapters peft last set trainable (empty tensors stay frozen)
        self.persedit_sizes: dict[str, dict[str, list[int]]] = {}  # adapter → its config's bank_sizes
        self.persedit_key = kwargs.pop("current_key", "")
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._packed_cache: tuple[tuple, PackedBank] | None = None
        self.kwargs = kwargs
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        elif isinstance(base, Conv1D):
            self.in_features, self.out_features = base.weight.shape
        else:
            raise TypeError(
                f"PERSEDIT can only wrap nn.Linear or transformers Conv1D layers, got {type(base).__name__}; "
                "pick the MLP output projection with target_modules"
            )
        self.register_load_state_dict_pre_hook(resize_banks_before_load)

    # ----------------------------------------------------------------------------------------------- banks
    def _tensor(self, name: str, adapter: str) -> torch.Tensor:
        return getattr(self, f"persedit_{name}")[adapter]

    def _set_tensor(self, name: str, adapter: str, value: torch.Tensor) -> None:
        container = getattr(self, f"persedit_{name}")
        if name in _FLOAT_TENSORS:
            old = container[adapter] if adapter in container else None
            trainable = old.requires_grad if old is not None and old.numel() else (  # an empty one was frozen
                adapter in self.persedit_grad_on and name in self.persedit_trainable.get(adapter, ()))
            trainable = trainable and value.numel() > 0
            container[adapter] = nn.Parameter(value, requires_grad=trainable)
        else:
            container[adapter] = value
        self._packed_cache = None

    def _sync_sizes(self, adapter: str) -> None:
        """Record the bank's sizes in the adapter config (``bank_sizes``), which loaders size banks from."""
        if adapter in self.persedit_sizes:
            sizes = [self.num_keys(adapter), self.num_clusters(adapter), int(self.persedit_A[adapter].shape[0])]
            self.persedit_sizes[adapter][self.persedit_key] = sizes

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """peft's move, with the cluster-index buffers kept integral (peft 0.18 casts them to W's dtype)."""
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        for name in _INDEX_TENSORS:
            index = self._tensor(name, adapter_name) if adapter_name in getattr(self, f"persedit_{name}") else None
            if index is not None and index.is_floating_point():
                self._set_tensor(name, adapter_name, index.long())

    def update_layer(self, adapter_name: str, config: PersonalizationEditConfig, **kwargs: Any) -> None:
        """Create an empty bank for ``adapter_name`` (or ``init_clusters`` always-on clusters: B = 0, or random
        A and B with ``init_weights=False``)."""
        if adapter_name == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is reserved for 'no edit' in mixed batches; pick another name")
        self.persedit_gate[adapter_name] = (config.gate, float(config.gate_temperature))
        self.persedit_trainable[adapter_name] = tuple(config.trainable)
        weight = self.get_base_layer().weight
        device, dtype = weight.device, weight.dtype if weight.dtype.is_floating_point else torch.float32
        saved = saved_bank_sizes(config).get(self.persedit_key)  # a saved adapter: size the bank for its tensors
        self.persedit_sizes[adapter_name] = config.bank_sizes
        self.resize_bank(adapter_name, *(saved or (0, 0, 0)), device=device, dtype=dtype)
        if config.init_clusters and not saved:
            n, r = config.init_clusters, config.init_rank
            # identity start: B = 0 and a reproducible A; init_weights=False: both random (torch's global RNG)
            generator = torch.Generator().manual_seed(0) if config.init_weights else None
            A = torch.randn(n * r, self.in_features, generator=generator) / self.in_features**0.5
            B = torch.zeros(self.out_features, n * r) if config.init_weights else torch.randn(
                self.out_features, n * r) / (n * r) ** 0.5
            self.add_clusters(
                adapter_name,
                keys=torch.zeros(0, self.in_features),
                key_cluster=torch.zeros(0, dtype=torch.long),
                tau=torch.full((n,), float("-inf")),  # τ = −∞: always fires
                A=A,
                B=B,
                rank_cluster=torch.arange(n).repeat_interleave(r),
            )
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def resize_bank(self, adapter: str, num_keys: int, num_clusters: int, rank: int,
                    device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        """Replace ``adapter``'s bank by zeros of the given sizes (the loader fills them in)."""
        ref = self.persedit_A[adapter] if adapter in self.persedit_A else self.get_base_layer().weight
        device = device or ref.device
        dtype = dtype or (ref.dtype if ref.dtype.is_floating_point else torch.float32)
        shapes = {
            "keys": (num_keys, self.in_features), "A": (rank, self.in_features), "B": (self.out_features, rank),
            "shift": (num_clusters, self.out_features), "tau": (num_clusters,), "key_cluster": (num_keys,),
            "rank_cluster": (rank,), "center": (self.in_features,),
        }
        for name, shape in shapes.items():
            t_dtype = torch.long if name in _INDEX_TENSORS else dtype
            self._set_tensor(name, adapter, torch.zeros(shape, device=device, dtype=t_dtype))
        self._sync_sizes(adapter)

    def num_clusters(self, adapter: str) -> int:
        return int(self.persedit_tau[adapter].shape[0]) if adapter in self.persedit_tau else 0

    def num_keys(self, adapter: str) -> int:
        return int(self.persedit_keys[adapter].shape[0]) if adapter in self.persedit_keys else 0

    def bank(self, adapter: str) -> EditBank:
        """``adapter``'s bank as an :class:`EditBank` of the live tensors (gradients flow)."""
        gate, temperature = self.persedit_gate[adapter]
        return EditBank(
            keys=self.persedit_keys[adapter], key_cluster=self.persedit_key_cluster[adapter],
            tau=self.persedit_tau[adapter], A=self.persedit_A[adapter], B=self.persedit_B[adapter],
            rank_cluster=self.persedit_rank_cluster[adapter], shift=self.persedit_shift[adapter],
            center=self.persedit_center[adapter], gate=gate, temperature=temperature,
        )

    @torch.no_grad()
    def add_clusters(self, adapter: str, *, keys: torch.Tensor, key_cluster: torch.Tensor, tau: torch.Tensor,
                     A: torch.Tensor, B: torch.Tensor, rank_cluster: torch.Tensor,
                     shift: torch.Tensor | None = None) -> list[int]:
        """Append clusters; ``key_cluster``/``rank_cluster`` number the new clusters 0..n−1. Returns their ids.

        Keys are normalised to unit length after subtracting the layer's centre μ.
        """
        n_new = int(tau.shape[0])
        if keys.shape[-1] != self.in_features or A.shape[-1] != self.in_features or B.shape[0] != self.out_features:
            raise ValueError(
                f"cluster shapes do not fit this layer (d_in={self.in_features}, d_out={self.out_features}): "
                f"keys {tuple(keys.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}"
            )
        if B.shape[1] != A.shape[0] or rank_cluster.shape[0] != A.shape[0] or key_cluster.shape[0] != keys.shape[0]:
            raise ValueError("A rows, B columns, rank_cluster and key_cluster/keys lengths must agree")
        for name, index in (("key_cluster", key_cluster), ("rank_cluster", rank_cluster)):
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n_new):
                raise ValueError(f"{name} must number the {n_new} new clusters 0..{n_new - 1}")
        first = self.num_clusters(adapter)
        old = self.bank(adapter)
        center = old.center.float()
        unit = torch.nn.functional.normalize(keys.to(center.device).float() - center, dim=-1)
        shift = torch.zeros(n_new, self.out_features) if shift is None else shift
        new = {
            "keys": unit, "key_cluster": key_cluster + first, "tau": tau, "A": A, "B": B,
            "rank_cluster": rank_cluster + first, "shift": shift,
        }
        for name, value in new.items():
            current = self._tensor(name, adapter)
            value = value.to(device=current.device, dtype=current.dtype)
            self._set_tensor(name, adapter, torch.cat([current.detach(), value], dim=1 if name == "B" else 0))
        self._sync_sizes(adapter)
        return list(range(first, first + n_new))

    @torch.no_grad()
    def remove_clusters(self, adapter: str, clusters: list[int]) -> None:
        """Drop whole clusters (their keys, rank rows and shifts) and renumber the rest."""
        n = self.num_clusters(adapter)
        keep = torch.ones(n, dtype=torch.bool)
        for c in clusters:
            if not 0 <= c < n:
                raise IndexError(f"cluster {c} out of range for adapter {adapter!r} with {n} clusters")
            keep[c] = False
        renumber = torch.cumsum(keep.long(), 0) - 1
        bank = self.bank(adapter)
        key_keep = keep[bank.key_cluster.cpu()].to(bank.keys.device)
        rank_keep = keep[bank.rank_cluster.cpu()].to(bank.A.device)
        keep_dev = keep.to(bank.tau.device)
        renumber = renumber.to(bank.key_cluster.device)
        updates = {
            "keys": bank.keys[key_keep], "key_cluster": renumber[bank.key_cluster[key_keep]],
            "tau": bank.tau[keep_dev], "A": bank.A[rank_keep], "B": bank.B[:, rank_keep],
            "rank_cluster": renumber[bank.rank_cluster[rank_keep]], "shift": bank.shift[keep_dev],
        }
        for name, value in updates.items():
            self._set_tensor(name, adapter, value.detach().clone())
        self._sync_sizes(adapter)

    @torch.no_grad()
    def set_center(self, adapter: str, center: torch.Tensor) -> None:
        """Set μ (only while the bank has no keys: existing keys were centred with the old μ)."""
        if self.num_keys(adapter):
            raise ValueError("set_center must be called before any keyed cluster is added")
        self._set_tensor("center", adapter, center.to(self.persedit_center[adapter]).clone())

    # ----------------------------------------------------------------------------------------- trainability
    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        self.persedit_grad_on = set() if inference_mode else names
        self.freeze_untrainable()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        self.persedit_grad_on = self.persedit_grad_on | names if requires_grad else self.persedit_grad_on - names
        self.freeze_untrainable()

    def freeze_untrainable(self) -> None:
        """Turn gradients off for the bank tensors an adapter's config does not list as ``trainable`` and for
        empty ones (no gradient reaches a 0×d tensor; :meth:`_set_tensor` turns them on when the bank grows)."""
        for adapter, trainable in self.persedit_trainable.items():
            for name in _FLOAT_TENSORS:
                container = getattr(self, f"persedit_{name}")
                if adapter in container and (name not in trainable or not container[adapter].numel()):
                    container[adapter].requires_grad_(False)
        self._packed_cache = None

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.persedit_sizes.pop(adapter_name, None)
        self.persedit_gate.pop(adapter_name, None)
        self.persedit_trainable.pop(adapter_name, None)
        self.persedit_grad_on.discard(adapter_name)
        self._packed_cache = None

    # ---------------------------------------------------------------------------------------------- merging
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW = B A in the base layer's weight layout (only exact for ungated banks)."""
        self._check_mergeable(adapter)
        delta = self.persedit_B[adapter].float() @ self.persedit_A[adapter].float()
        if isinstance(self.get_base_layer(), Conv1D):
            delta = delta.T
        return delta

    def _check_mergeable(self, adapter: str) -> None:
        """Raise unless the bank is input-independent: gate 'none', no clusters, or only always-on (τ = −∞) ones."""
        gate = self.persedit_gate[adapter][0]
        keyed = int((~torch.isneginf(self.persedit_tau[adapter])).sum())
        if gate != "none" and keyed:
            raise ValueError(
                f"adapter {adapter!r} cannot be merged: {keyed} of its clusters are gated (gate={gate!r}), so "
                "their delta g_c(x)·B_c A_c x depends on the input and no fixed weight W' equals it. Merge only "
                "adapters created with gate='none' (or whose clusters all have τ = −∞), or keep it unmerged."
            )
        base = self.get_base_layer()
        if base.bias is None and bool(self.persedit_shift[adapter].abs().sum() > 0):
            raise ValueError(f"adapter {adapter!r} has constant shifts but the base layer has no bias to merge into")

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.persedit_A]
        for adapter in adapter_names:
            self._check_mergeable(adapter)
        for adapter in adapter_names:
            self._add_to_base(adapter, sign=1.0, safe=safe_merge)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.persedit_A:
                self._add_to_base(adapter, sign=-1.0)

    def _add_to_base(self, adapter: str, sign: float, safe: bool = False) -> None:
        """W ± ΔW and b ± Σ_c shift_c (computed in fp32)."""
        base = self.get_base_layer()
        weight = base.weight.data.float() + sign * self.get_delta_weight(adapter)
        if safe and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs detected in the merged weights of adapter {adapter!r}")
        base.weight.data = weight.to(base.weight.dtype)
        if base.bias is not None:
            bias = base.bias.data.float() + sign * self.persedit_shift[adapter].float().sum(0)
            base.bias.data = bias.to(base.bias.dtype)


def _pack(banks: list[EditBank]) -> PackedBank:
    """:func:`pack_banks`; for one bank, the float tensors are the live ones (views, no copies)."""
    packed = pack_banks(banks)
    if len(banks) > 1:
        return packed
    bank = banks[0]
    live = {"keys": bank.keys, "A": bank.A, "B": bank.B, "shift": bank.shift, "center": bank.center[None]}
    live = {name: t for name, t in live.items() if t.dtype == packed.A.dtype and t.device == packed.A.device}
    if bank.tau.dtype == torch.float32:
        live["tau"] = bank.tau
    return dataclasses.replace(packed, **live)


class PersEditLinear(nn.Module, PersEditLayer):
    """PERSEDIT wrapper around an ``nn.Linear`` or ``Conv1D`` MLP output projection."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: PersonalizationEditConfig,
                 **kwargs: Any) -> None:
        super().__init__()
        PersEditLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def packed_bank(self, adapters: list[str]) -> PackedBank:
        """The banks of ``adapters`` packed (cached while no tensor changed and none needs gradients).

        A single adapter's packed bank views its live float tensors, so even edits through ``.data`` (which
        bypass the version counter) show at once; several adapters are concatenated copies.
        """
        banks = [self.bank(a) for a in adapters]
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for b in banks for t in (b.A, b.B, b.keys, b.shift))
        if needs_grad:
            return _pack(banks)
        signature = tuple(
            (a, t.data_ptr(), tensor_version(t), t.dtype, t.device, tuple(t.shape))
            for a, b in zip(adapters, banks)
            for t in (b.keys, b.key_cluster, b.tau, b.A, b.B, b.rank_cluster, b.shift, b.center)
        ) + tuple(self.persedit_gate[a] for a in adapters)
        if self._packed_cache is None or self._packed_cache[0] != signature:
            self._packed_cache = (signature, _pack(banks))
        return self._packed_cache[1]

    def _slots(self, x: torch.Tensor, adapter_names: list[str] | None) -> tuple[list[str], list[torch.Tensor]]:
        """Adapters to pack and, per composition slot, each token's adapter position (−1 = none)."""
        tokens = x.shape[:-1].numel()
        if adapter_names is None:
            names = [a for a in self.active_adapters if a in self.persedit_A]
            return names, [torch.full((tokens,), i, dtype=torch.long, device=x.device) for i in range(len(names))]
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {x.shape[0]} rows")
        rows = [[p for p in name.split("+") if p != BASE_ADAPTER] for name in adapter_names]
        names = sorted({p for parts in rows for p in parts if p in self.persedit_A})
        per_token = tokens // x.shape[0]
        slots = []
        for j in range(max((len(r) for r in rows), default=0)):
            index = [names.index(r[j]) if j < len(r) and r[j] in names else -1 for r in rows]
            slots.append(torch.tensor(index, device=x.device).repeat_interleave(per_token))
        return names, slots

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str] | None = None,
                **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None and self.merged:
            raise ValueError("adapter_names cannot be used while adapters are merged; unmerge first")
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        names, slots = self._slots(x, adapter_names)
        if not names or not any(self.num_clusters(a) for a in names):
            return result
        bank = self.packed_bank(names)
        flat = x.reshape(-1, self.in_features)
        delta = sum(gated_edit(flat, bank, index) for index in slots)
        return result + delta.reshape(result.shape).to(result.dtype)

    def __repr__(self) -> str:
        return "persedit." + super().__repr__()
