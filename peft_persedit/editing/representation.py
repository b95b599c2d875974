"""Self-generated representation edits (after CHAMELEON, "Personalize Your LLM: Fake it then Align it").

No labels: for preference p and generic prompts x_j the base model writes two responses, y⁺_j with p stated
in the system prompt and y⁻_j without it. Both are read back *without* p (as at inference): h_l(x, y) is the
mean, over the positions that predict y's tokens, of the residual stream after decoder block l, which is
where edit layer l's output lands. With d_j = h_l(x_j, y⁺_j) − h_l(x_j, y⁻_j) stacked as D [n, d]:

    D = U Σ Vᵀ (torch.linalg.svd),   V_r = top-r right singular vectors,   s_l = V_r V_rᵀ mean_j d_j

(rank 1: s_l = ⟨d̄, u⟩ u, so α = 1 moves the mean neutral state onto the mean personalised one along u).
With ``subtract_neutral`` the neutral direction n (top right singular vector of the neutral states H⁻) is
projected out: s_l ← s_l − ⟨s_l, n⟩ n. Each of the L edit layers then adds shift_l = α · s_l / L.

α is chosen per preference from ``alphas`` on the model's own held-out generations: with the candidate edit
active (and p absent from the prompt), α* = argmax_α mean_j log p_α(y⁺_j | x_j) / |y⁺_j| over held-out
prompts; too large an α makes every text unlikely. Ties go to the smaller α (α = 0: the edit does nothing).
Each preference is searched in a scratch adapter of its own, so preferences of one adapter do not interact.

The edit is one rank-0 cluster per edit layer (no A/B rows, ``shift`` = shift_l), gated by keys like the
engine's (``gate="keys"``: the preference's cluster questions × context prefixes at the key token, τ
calibrated against neutral self-generated text) or always on (``gate="always"``: τ = −∞). Its entry in
``config.preferences`` carries ``"kind": "representation"`` and the chosen ``"alpha"``, so it saves, loads,
mixes in batches, trains (``trainable=["shift"]``) and is forgotten like every other edit.

The gates live in :mod:`.representation_gates`, the text scoring (read-back, span means, log-likelihood) in
:mod:`.texts`; the editor's public helpers (clusters, key prompts, contexts, statistics, adapter configs) are
shared with the engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from ..peft_type import BASE_ADAPTER
from ..preferences import Preference
from ..prompts import load_prompt_set
from .chat import chat_text, pad_id
from .decoding import eval_mode
from .report import EditReport, PreferenceResult, StageTimer
from .representation_gates import ClusterGate, add_shift_cluster, always_on, cluster_centers, keyed_gates
from .selftext import HELD_OUT_PROMPTS, generate
from .texts import Texts, read_back, response_log_likelihood, span_means, statement
from .verify import answer_questions, target_hit

__all__ = ["SYSTEM_TEMPLATE", "ClusterGate", "RepresentationOptions", "Texts", "add_shift_cluster", "always_on",
           "block_index", "choose_alpha", "edit_representation", "preference_shift", "read_back",
           "response_log_likelihood", "statement"]

Job = tuple[str, Preference]  # (adapter, preference)

SYSTEM_TEMPLATE = "The user told you: \"{statement}\" Always keep this in mind and tailor your answer to this user."
SCRATCH = "__repr_search_{}"


@dataclass
class RepresentationOptions:
    """Knobs of :func:`edit_representation`.

    ``fit_prompts`` generic prompts estimate the direction, the next ``select_prompts`` choose α; with
    ``own_questions`` the preference's first ``own_questions`` cluster questions join both sets.
    """

    gate: Literal["keys", "always"] = "keys"
    fit_prompts: int = 8
    select_prompts: int = 4
    own_questions: int = 3
    rank: int = 1
    subtract_neutral: bool = False
    alphas: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    max_new_tokens: int = 40
    system_template: str = SYSTEM_TEMPLATE
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.gate not in ("keys", "always"):
            raise ValueError(f"gate must be 'keys' or 'always', got {self.gate!r}")
        if self.rank < 1 or self.fit_prompts + self.own_questions < 1 or not self.alphas:
            raise ValueError("need rank ≥ 1, at least one fitting prompt and at least one α candidate")


def preference_shift(diffs: torch.Tensor, neutral: torch.Tensor | None = None, rank: int = 1) -> torch.Tensor:
    """s = V_r V_rᵀ mean(D) from the top-``rank`` right singular vectors of ``diffs`` [n, d] (sign-free), minus
    its component along the top right singular vector of ``neutral`` [m, d] when given."""
    d = diffs.double()
    basis = torch.linalg.svd(d, full_matrices=False).Vh[:rank]
    shift = basis.T @ (basis @ d.mean(0))
    if neutral is not None and neutral.shape[0]:
        n = torch.linalg.svd(neutral.double(), full_matrices=False).Vh[0]
        shift = shift - (shift @ n) * n
    return shift.float()


def choose_alpha(scores: torch.Tensor, alphas: tuple[float, ...], tolerance: float = 1e-4) -> int:
    """Index of the best α for ``scores`` [len(alphas)]; a larger α must beat the best smaller one by ``tolerance``."""
    order = sorted(range(len(alphas)), key=lambda i: alphas[i])
    best = order[0]
    for i in order[1:]:
        if float(scores[i]) > float(scores[best]) + tolerance:
            best = i
    return best


def block_index(module_name: str) -> int:
    """Decoder block of an edit module from its name (``model.layers.5.mlp.down_proj`` → 5)."""
    numbers = re.findall(r"\.(\d+)\.", f".{module_name}.")
    if not numbers:
        raise ValueError(f"cannot tell which decoder block edit module {module_name!r} belongs to")
    return int(numbers[-1])


# --------------------------------------------------------------------------------------------- the edit
@dataclass
class _Samples:
    """Per job: fitting and selection prompts with the personalised responses; neutral response per prompt."""

    fit: list[list[str]]
    select: list[list[str]]
    personal: list[dict[str, str]]
    neutral: dict[str, str]


def _self_generate(editor, jobs: list[Job], opts: RepresentationOptions) -> _Samples:
    """Prompt sets per job and the base model's greedy responses with and without the preference."""
    generic = load_prompt_set("neutral_prompts")[HELD_OUT_PROMPTS:]
    fit, select = generic[:opts.fit_prompts], generic[opts.fit_prompts:opts.fit_prompts + opts.select_prompts]
    own = [p.cluster_questions()[:opts.own_questions] for _, p in jobs]
    pm, tokenizer = editor.model, editor.tokenizer
    unique = list(dict.fromkeys(fit + select + [q for qs in own for q in qs]))
    asks = [(i, x) for i, qs in enumerate(own) for x in dict.fromkeys(fit + select + qs)]
    systems = [opts.system_template.format(statement=statement(p)) for _, p in jobs]
    texts = [chat_text(tokenizer, x) for x in unique] + [chat_text(tokenizer, x, systems[i]) for i, x in asks]
    with pm.disable_adapter():
        answers = generate(pm, tokenizer, texts, opts.max_new_tokens, batch_size=opts.batch_size)
    personal: list[dict[str, str]] = [{} for _ in jobs]
    for (i, x), answer in zip(asks, answers[len(unique):]):
        personal[i][x] = answer
    return _Samples([fit + qs for qs in own], [select + qs for qs in own], personal,
                    dict(zip(unique, answers[:len(unique)])))


def _directions(editor, samples: _Samples, opts: RepresentationOptions) -> dict[str, torch.Tensor]:
    """Per edit module: [jobs, d_out] shifts at α = 1 (already divided by the number of edit layers)."""
    pm, tokenizer = editor.model, editor.tokenizer
    names = list(editor.modules)
    blocks = [block_index(n) for n in names]
    prompts = list(samples.neutral) + [x for fit in samples.fit for x in fit]
    responses = list(samples.neutral.values()) + [samples.personal[i][x] for i, fit in enumerate(samples.fit)
                                                   for x in fit]
    with pm.disable_adapter():
        states = span_means(pm, read_back(tokenizer, prompts, responses), blocks, pad_id(tokenizer), opts.batch_size)
    row = {x: j for j, x in enumerate(samples.neutral)}
    out = {}
    for slot, name in enumerate(names):
        neutral, personal = states[slot][:len(row)], states[slot][len(row):].split([len(f) for f in samples.fit])
        shifts = []
        for fit, h_plus in zip(samples.fit, personal):
            h_minus = neutral[[row[x] for x in fit]]
            shifts.append(preference_shift(h_plus - h_minus, h_minus if opts.subtract_neutral else None, opts.rank))
        out[name] = torch.stack(shifts) / len(names)
    return out


@torch.no_grad()
def _search_alpha(editor, jobs: list[Job], samples: _Samples, gates: dict[str, list[ClusterGate]],
                  shifts: dict[str, torch.Tensor], centers: dict[str, list[torch.Tensor]], opts: RepresentationOptions
                  ) -> tuple[list[float], list[float]]:
    """α* per job (see module docstring) and its mean held-out log-likelihood, each job in a scratch adapter."""
    pm, tokenizer = editor.model, editor.tokenizer
    scratch = [SCRATCH.format(i) for i in range(len(jobs))]
    prompts = [x for sel in samples.select for x in sel]
    owner = [i for i, sel in enumerate(samples.select) for _ in sel]
    texts = read_back(tokenizer, prompts, [samples.personal[i][x] for i, x in zip(owner, prompts)])
    scores = torch.zeros(len(opts.alphas), len(jobs))
    try:
        for i, name in enumerate(scratch):
            pm.add_adapter(name, editor.adapter_config(init_clusters=0))
            for module_name, module in editor.modules.items():
                module.set_center(name, centers[module_name][i])
                add_shift_cluster(module, name, gates[module_name][i], shifts[module_name][i])
        for k, alpha in enumerate(opts.alphas):
            for module_name, module in editor.modules.items():
                for i, name in enumerate(scratch):
                    module.persedit_shift[name][0] = alpha * shifts[module_name][i]
            ll = response_log_likelihood(pm, texts, pad_id(tokenizer), [scratch[i] for i in owner], opts.batch_size)
            scores[k] = torch.zeros(len(jobs)).index_add_(0, torch.tensor(owner), ll) / torch.bincount(
                torch.tensor(owner), minlength=len(jobs)).clamp(min=1)
    finally:
        for name in scratch:
            if name in pm.peft_config:
                pm.delete_adapter(name)
    best = [choose_alpha(scores[:, i], opts.alphas) for i in range(len(jobs))]
    return [float(opts.alphas[b]) for b in best], [float(scores[b, i]) for i, b in enumerate(best)]


def _gates(editor, jobs: list[Job], samples: _Samples, opts: RepresentationOptions
           ) -> tuple[dict[str, list[ClusterGate]], dict[str, list[torch.Tensor]]]:
    """Per edit module and job: the cluster's gate (keyed on the neutral self-generations, or always on) and μ."""
    stats = editor.neutral_stats()
    centers = cluster_centers(editor, jobs, stats)
    if opts.gate == "always":
        return {name: [always_on(m.in_features)] * len(jobs) for name, m in editor.modules.items()}, centers
    neutral = read_back(editor.tokenizer, list(samples.neutral), list(samples.neutral.values()))
    return keyed_gates(editor, jobs, neutral, centers, stats), centers


def _add_edits(editor, jobs: list[Job], gates: dict[str, list[ClusterGate]], shifts: dict[str, torch.Tensor],
               centers: dict[str, list[torch.Tensor]], alphas: list[float], opts: RepresentationOptions) -> None:
    """Each job's cluster with shift α* · s_l in every edit layer, and its entry in ``config.preferences``."""
    for name, module in editor.modules.items():
        for i, (adapter, _) in enumerate(jobs):
            if opts.gate == "keys" and not module.num_keys(adapter):
                module.set_center(adapter, centers[name][i])
            add_shift_cluster(module, adapter, gates[name][i], alphas[i] * shifts[name][i])
    for (adapter, pref), alpha in zip(jobs, alphas):
        editor.model.peft_config[adapter].preferences.append(
            {**pref.to_dict(), "kind": "representation", "alpha": alpha, "gate": opts.gate, "rank": opts.rank})


def _answers(editor, jobs: list[Job], routed: bool) -> list[str]:
    """Greedy answers to the jobs' questions, through their adapters (``routed``) or the base model."""
    adapters = [a for a, _ in jobs] if routed else [BASE_ADAPTER] * len(jobs)
    return answer_questions(editor.model, editor.tokenizer, [p.question for _, p in jobs], adapters)


def _check_jobs(editor, jobs: list[Job]) -> None:
    """Create missing adapters; refuse a preference its adapter already holds."""
    for adapter, pref in jobs:
        editor.ensure_adapter(adapter)
        if pref.id in {e["id"] for e in editor.model.peft_config[adapter].preferences}:
            raise ValueError(f"adapter {adapter!r} already holds preference {pref.id!r}; forget it first")


def edit_representation(editor, jobs: list[Job], verify: bool = True, options: RepresentationOptions | None = None,
                        **kwargs) -> EditReport:
    """Representation edits for (adapter, preference) jobs of a :class:`PersonalizationEditor` (batched):
    self-generate → directions s_l → gates → α* → apply.

    ``kwargs`` are :class:`RepresentationOptions` fields (when ``options`` is not given).
    """
    opts = options or RepresentationOptions(**kwargs)
    if opts.select_prompts + opts.own_questions < 1:
        raise ValueError("α selection needs select_prompts + own_questions ≥ 1")
    lap = StageTimer()
    if not jobs:
        return EditReport([], lap.timings)
    _check_jobs(editor, jobs)
    pm = editor.model
    with eval_mode(pm):
        before = _answers(editor, jobs, routed=False) if verify else [""] * len(jobs)
        lap("verify_before")
        samples = _self_generate(editor, jobs, opts)
        lap("generate")
        shifts = _directions(editor, samples, opts)
        lap("directions")
        gates, centers = _gates(editor, jobs, samples, opts)
        lap("gate")
        alphas, scores = _search_alpha(editor, jobs, samples, gates, shifts, centers, opts)
        lap("alpha")
        _add_edits(editor, jobs, gates, shifts, centers, alphas, opts)
        lap("apply")
        after = _answers(editor, jobs, routed=True) if verify else [""] * len(jobs)
        lap("verify_after")
    first = gates[next(iter(editor.modules))]
    results = [PreferenceResult(
        adapter=adapter, id=pref.id, question=pref.question, target=pref.target, answer_before=b, answer_after=a,
        hit_before=target_hit(b, pref.target), hit_after=target_hit(a, pref.target), tau=first[i].tau,
        value_nll=-scores[i], cluster_size=int(first[i].keys.shape[0]), false_fire=first[i].false_fire)
        for i, ((adapter, pref), b, a) in enumerate(zip(jobs, before, after))]
    return EditReport(results, lap.timings, verified=verify)
