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
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..preferences import Preference
from ..prompts import load_prompt_set
from .chat import chat_text, encode, pad_batch, pad_id
from .clusters import kmeans
from .gate import calibrate, cluster_max_scores
from .keys import layer_inputs
from .report import EditReport, PreferenceResult
from .selftext import HELD_OUT_PROMPTS, context_prefixes, generate
from .statistics import layer_stats
from .verify import answer_questions, target_hit

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


def statement(pref: Preference) -> str:
    """The preference in the user's words: ``text``, else "My {subject} is {target}."."""
    return pref.text or f"My {pref.subject} is {pref.target}."


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


# ------------------------------------------------------------------------------------- scoring texts
@dataclass
class Texts:
    """Prompt + response token ids; ``spans[i] = (a, b)``: positions a..b−1 predict the response tokens."""

    sequences: list[list[int]]
    spans: list[tuple[int, int]]


def read_back(tokenizer, prompts: list[str], responses: list[str]) -> Texts:
    """Each response after its prompt in the chat template (no system prompt), ending in eos."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    sequences, spans = [], []
    for prompt, response in zip(prompts, responses):
        head = encode(tokenizer, chat_text(tokenizer, prompt))
        tail = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
        tail = tail or [pad_id(tokenizer)]
        sequences.append(head + tail)
        spans.append((len(head) - 1, len(head) + len(tail) - 1))
    return Texts(sequences, spans)


def _batches(model: nn.Module, texts: Texts, pad: int, batch_size: int, adapters: list[str] | None = None,
             hidden: bool = False) -> Iterator[tuple[int, torch.Tensor, object]]:
    """(first row, input ids, model output) per right-padded batch; rows routed through ``adapters``."""
    device = next(model.parameters()).device
    for start in range(0, len(texts.sequences), batch_size):
        ids, mask = pad_batch(texts.sequences[start:start + batch_size], pad)
        kwargs = {"adapter_names": adapters[start:start + batch_size]} if adapters is not None else {}
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=hidden, **kwargs)
        yield start, ids.to(device), out


@torch.no_grad()
def span_means(model: nn.Module, texts: Texts, blocks: list[int], pad: int, batch_size: int = 16) -> list[torch.Tensor]:
    """Per block l in ``blocks``: [N, d] means over each span of the residual stream after block l."""
    out: list[list[torch.Tensor]] = [[] for _ in blocks]
    for start, _, result in _batches(model, texts, pad, batch_size, hidden=True):
        for slot, block in enumerate(blocks):
            states = result.hidden_states[block + 1].float()
            for row in range(states.shape[0]):
                a, b = texts.spans[start + row]
                out[slot].append(states[row, a:b].mean(0))
    return [torch.stack(o) for o in out]


@torch.no_grad()
def response_log_likelihood(model: nn.Module, texts: Texts, pad: int, adapters: list[str] | None = None,
                            batch_size: int = 16) -> torch.Tensor:
    """[N] mean log p(response token | everything before it), row i through ``adapters[i]``."""
    scores = []
    for start, ids, result in _batches(model, texts, pad, batch_size, adapters):
        logp = torch.log_softmax(result.logits.float(), dim=-1)
        for row in range(ids.shape[0]):
            a, b = texts.spans[start + row]
            targets = ids[row, a + 1:b + 1]
            scores.append(logp[row, a:b].gather(-1, targets[:, None]).mean())
    return torch.stack(scores).cpu()


# ------------------------------------------------------------------------------------------- gates
@dataclass
class ClusterGate:
    """What decides where one preference's cluster fires in one layer: raw keys (may be none) and τ."""

    keys: torch.Tensor
    tau: float


def always_on(d_in: int) -> ClusterGate:
    return ClusterGate(torch.zeros(0, d_in), float("-inf"))


def keyed_gates(editor, jobs: list[tuple[str, Preference]], neutral: Texts, centers: dict[str, list[torch.Tensor]]
                ) -> dict[str, list[ClusterGate]]:
    """Per edit module: keys (cluster questions at the key token, alone and averaged over context prefixes, k-means
    compressed, as the engine's) and τ
    (calibrated on all tokens of the neutral texts, plus the neutral corpus statistics with mom2="self")."""
    pm, tokenizer, config = editor.model, editor.tokenizer, editor.config
    modules = editor.modules
    members = editor._members(jobs)
    with pm.disable_adapter():
        contexts = [""] + context_prefixes(pm, tokenizer, config.contexts)
        stats = layer_stats(pm, tokenizer, modules) if config.mom2 == "self" else None
        prompts = [editor._prompt(q, s, ctx, p.id)
                   for (_, p), cluster in zip(jobs, members) for q, s in cluster for ctx in contexts]
        pad = pad_id(tokenizer)
        inputs = layer_inputs(pm, list(modules.values()), [ids for ids, _ in prompts], pad, [i for _, i in prompts])
        negatives = layer_inputs(pm, list(modules.values()), neutral.sequences, pad)
    counts = [len(cl) * len(contexts) for cl in members]
    out: dict[str, list[ClusterGate]] = {}
    for slot, name in enumerate(modules):
        neg = negatives[slot] if stats is None else torch.cat([negatives[slot], stats[name].samples])
        rows = inputs[slot].split(counts)
        gates = []
        for i, (x, cluster) in enumerate(zip(rows, members)):
            center = centers[name][i]
            rows = x.reshape(len(cluster), len(contexts), -1)  # the inference-format key and its context mean
            keys = kmeans(torch.cat([rows[:, 0], rows.mean(1)]) if len(contexts) > 1 else rows[:, 0],
                          config.max_keys_per_cluster)
            unit = [torch.nn.functional.normalize(keys - center, dim=-1)]
            positive = cluster_max_scores(x, center, unit)[:, 0]
            tau = calibrate([positive], cluster_max_scores(neg, center, unit), config.false_fire_rate).tau[0]
            gates.append(ClusterGate(keys, float(tau)))
        out[name] = gates
    return out


def add_shift_cluster(module, adapter: str, gate: ClusterGate, shift: torch.Tensor) -> None:
    """Append one rank-0 cluster (keys/τ of ``gate``, constant delta ``shift``) to ``adapter``'s bank."""
    n_keys = gate.keys.shape[0]
    module.add_clusters(
        adapter, keys=gate.keys, key_cluster=torch.zeros(n_keys, dtype=torch.long), tau=torch.tensor([gate.tau]),
        A=torch.zeros(0, module.in_features), B=torch.zeros(module.out_features, 0),
        rank_cluster=torch.zeros(0, dtype=torch.long), shift=shift[None])


def _centers(editor, jobs: list[tuple[str, Preference]]) -> dict[str, list[torch.Tensor]]:
    """μ each job's cluster is scored with: its adapter's (fixed once keyed), else the neutral mean (mom2="self")."""
    stats = None
    if editor.config.mom2 == "self":
        with editor.model.disable_adapter():
            stats = layer_stats(editor.model, editor.tokenizer, editor.modules)
    out = {}
    for name, module in editor.modules.items():
        fresh = stats[name].mean if stats is not None else torch.zeros(module.in_features)
        out[name] = [module.persedit_center[a].detach().float().cpu() if module.num_keys(a) else fresh
                     for a, _ in jobs]
    return out


def _scratch_config(config):
    """A copy of ``config`` for an empty adapter (no preferences, no initial clusters, no saved bank sizes)."""
    scratch = copy.deepcopy(config)
    scratch.preferences, scratch.init_clusters, scratch.bank_sizes = [], 0, {}
    scratch._saved_bank_sizes = {}
    return scratch


# --------------------------------------------------------------------------------------------- the edit
@dataclass
class _Samples:
    """Per job: fitting and selection prompts with the personalised responses; neutral response per prompt."""

    fit: list[list[str]]
    select: list[list[str]]
    personal: list[dict[str, str]]
    neutral: dict[str, str]


def _self_generate(editor, jobs: list[tuple[str, Preference]], opts: RepresentationOptions) -> _Samples:
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
def _search_alpha(editor, jobs, samples: _Samples, gates, shifts, centers, opts: RepresentationOptions
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
            pm.add_adapter(name, _scratch_config(editor.config))
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


def edit_representation(editor, jobs: list[tuple[str, Preference]], verify: bool = True,
                        options: RepresentationOptions | None = None, **kwargs) -> EditReport:
    """Representation edits for (adapter, preference) jobs of a :class:`PersonalizationEditor` (batched).

    ``kwargs`` are :class:`RepresentationOptions` fields (when ``options`` is not given).
    """
    opts = options or RepresentationOptions(**kwargs)
    if opts.select_prompts + opts.own_questions < 1:
        raise ValueError("α selection needs select_prompts + own_questions ≥ 1")
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(stage: str) -> None:
        now = time.perf_counter()
        timings[stage] = timings.get(stage, 0.0) + now - clock[0]
        clock[0] = now

    if not jobs:
        return EditReport([], timings)
    for adapter, pref in jobs:
        editor._ensure_adapter(adapter)
        if pref.id in {e["id"] for e in editor.model.peft_config[adapter].preferences}:
            raise ValueError(f"adapter {adapter!r} already holds preference {pref.id!r}; forget it first")
    pm, tokenizer, modules = editor.model, editor.tokenizer, editor.modules
    questions = [p.question for _, p in jobs]
    was_training = pm.training
    pm.eval()
    try:
        before = answer_questions(pm, tokenizer, questions, ["__base__"] * len(jobs)) if verify else None
        lap("verify_before")
        samples = _self_generate(editor, jobs, opts)
        lap("generate")
        shifts = _directions(editor, samples, opts)
        lap("directions")
        centers = _centers(editor, jobs)
        if opts.gate == "keys":
            neutral = read_back(tokenizer, list(samples.neutral), list(samples.neutral.values()))
            gates = keyed_gates(editor, jobs, neutral, centers)
        else:
            gates = {name: [always_on(m.in_features)] * len(jobs) for name, m in modules.items()}
        lap("gate")
        alphas, scores = _search_alpha(editor, jobs, samples, gates, shifts, centers, opts)
        lap("alpha")
        for name, module in modules.items():
            for i, (adapter, _) in enumerate(jobs):
                if opts.gate == "keys" and not module.num_keys(adapter):
                    module.set_center(adapter, centers[name][i])
                add_shift_cluster(module, adapter, gates[name][i], alphas[i] * shifts[name][i])
        for (adapter, pref), alpha in zip(jobs, alphas):
            pm.peft_config[adapter].preferences.append(
                {**pref.to_dict(), "kind": "representation", "alpha": alpha, "gate": opts.gate, "rank": opts.rank})
        lap("apply")
        after = answer_questions(pm, tokenizer, questions, [a for a, _ in jobs]) if verify else None
        lap("verify_after")
    finally:
        pm.train(was_training)
    first = next(iter(modules))
    results = []
    for i, (adapter, pref) in enumerate(jobs):
        b, a = (before[i], after[i]) if verify else ("", "")
        results.append(PreferenceResult(
            adapter=adapter, id=pref.id, question=pref.question, target=pref.target, answer_before=b, answer_after=a,
            hit_before=target_hit(b, pref.target), hit_after=target_hit(a, pref.target), tau=gates[first][i].tau,
            value_nll=-scores[i], cluster_size=int(gates[first][i].keys.shape[0])))
    return EditReport(results, timings, verified=verify)
