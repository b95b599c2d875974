"""Where a representation edit fires: per preference and edit layer, keys and τ like the engine's (``gate="keys"``)
or always on (``gate="always"``: no keys, τ = −∞), and the rank-0 cluster that carries the shift.

Keyed: the keys are the engine's (:func:`~.keys.cluster_keys` over the cluster questions × key contexts, through
the editor's public helpers); τ_c is calibrated (:func:`~.gate.calibrate`) against every token of the neutral
self-generated texts (plus the neutral corpus samples with mom2="self"), scored around the centre μ each cluster
is stored with: its adapter's (fixed once keyed), else the neutral mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layer import PersEditLinear
from ..preferences import Preference
from .chat import pad_id
from .gate import calibrate, cluster_max_scores
from .keys import cluster_keys, layer_inputs
from .statistics import LayerStats
from .texts import Texts

Job = tuple[str, Preference]  # (adapter, preference)


@dataclass
class ClusterGate:
    """What decides where one preference's cluster fires in one layer: raw keys (may be none), τ, and the share
    of the calibration negatives it fires on."""

    keys: torch.Tensor
    tau: float
    false_fire: float = 0.0


def always_on(d_in: int) -> ClusterGate:
    return ClusterGate(torch.zeros(0, d_in), float("-inf"))


def cluster_centers(editor, jobs: list[Job], stats: dict[str, LayerStats] | None) -> dict[str, list[torch.Tensor]]:
    """μ each job's cluster is scored with, per edit module: its adapter's (fixed once keyed), else the neutral
    mean of ``stats`` (zero without)."""
    out = {}
    for name, module in editor.modules.items():
        fresh = stats[name].mean if stats is not None else torch.zeros(module.in_features)
        out[name] = [module.persedit_center[a].detach().float().cpu() if module.num_keys(a) else fresh
                     for a, _ in jobs]
    return out


def keyed_gates(editor, jobs: list[Job], neutral: Texts, centers: dict[str, list[torch.Tensor]],
                stats: dict[str, LayerStats] | None) -> dict[str, list[ClusterGate]]:
    """Per edit module and job: the engine's keys and τ calibrated on all tokens of the ``neutral`` texts (and the
    neutral corpus samples of ``stats``), all read from the base model."""
    pm, config, modules = editor.model, editor.config, editor.modules
    members = editor.members(jobs)
    contexts = editor.key_contexts()
    prompts, owner, shared = editor.key_prompts(jobs, members, contexts)
    pad = pad_id(editor.tokenizer)
    with pm.disable_adapter():
        inputs = layer_inputs(pm, list(modules.values()), [ids for ids, _ in prompts], pad, [i for _, i in prompts],
                              shared=shared)
        negatives = layer_inputs(pm, list(modules.values()), neutral.sequences, pad)
    out: dict[str, list[ClusterGate]] = {}
    for slot, name in enumerate(modules):
        neg = negatives[slot] if stats is None else torch.cat([negatives[slot], stats[name].samples])
        keys = cluster_keys(inputs[slot], owner, [len(c) for c in members], len(contexts), config.max_keys_per_cluster,
                            len(config.key_histories))
        gates = []
        for i, k in enumerate(keys):
            center = centers[name][i]
            unit = [torch.nn.functional.normalize(k - center, dim=-1)]
            positive = cluster_max_scores(inputs[slot][owner == i], center, unit)[:, 0]
            calibration = calibrate([positive], cluster_max_scores(neg, center, unit), config.false_fire_rate)
            gates.append(ClusterGate(k, float(calibration.tau[0]), float(calibration.false_fire[0])))
        out[name] = gates
    return out


def add_shift_cluster(module: PersEditLinear, adapter: str, gate: ClusterGate, shift: torch.Tensor) -> None:
    """Append one rank-0 cluster (keys/τ of ``gate``, constant delta ``shift``) to ``adapter``'s bank."""
    n_keys = gate.keys.shape[0]
    module.add_clusters(
        adapter, keys=gate.keys, key_cluster=torch.zeros(n_keys, dtype=torch.long), tau=torch.tensor([gate.tau]),
        A=torch.zeros(0, module.in_features), B=torch.zeros(module.out_features, 0),
        rank_cluster=torch.zeros(0, dtype=torch.long), shift=shift[None])
