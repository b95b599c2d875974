"""Values: the residual δ_i each preference needs at the edit layer's output, optimized for all at once.

For preference i with training prompts p (subject's last token s_p) and target y:

    δ_i* = argmin  Σ_p −log P(y | p; h_s += δ_i) / |y|  +  λ_KL · KL(P(·|n_i) ‖ P(·|n_i; h_s += δ_i))
                   + λ_wd ‖δ_i‖² / ‖v_i‖²,          subject to ‖δ_i‖ ≤ κ ‖v_i‖

(v_i = the original output at the subject token; n_i = "{subject} is a"). One Adam optimizer holds every
δ_i. Tokens before the subject never see δ, so their key/value cache is computed once and every step only
runs the suffix (subject token → end of target); rows of similar length share a chunk. Prompts that start
with the same earlier chat turns (``ValueRequest.shared``) share one batch-1 cache of those turns, repeated
per step: long histories cost one prefill per call and no memory per preference. A preference stops
as soon as greedy decoding reproduces its whole target on every prompt and its NLL < ε (what efficacy
needs); from then on its rows (prompts and KL) are dropped from their chunk, so each step costs only the
preferences still being optimized.

Once the target is said, δ should let the model go on as it would: with ``continuation`` c (the model's own
greedy tokens after prompt 0 + y, computed without δ), a further KL row adds

    λ_c · (1/|c|) Σ_j KL(P(·|p, y, c_<j) ‖ P(·|p, y, c_<j; h_s += δ_i))

so that an edit strong enough to hold after many chat turns does not derail the rest of the answer.

With ``rows_per_step`` = k, most steps are stochastic over prompts: each preference's loss is the mean over its
bare question and k − 1 of its other prompts drawn afresh (step cost ∝ k instead of its number of prompts); every
``full_every``-th step and the last use every prompt and decide when a preference is finished.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..peft_type import BASE_ADAPTER
from .chat import pad_batch
from .prefix_cache import cache_argument, decoder_of, repeated


@dataclass
class ValueRequest:
    """What one preference asks of the edit layer: prompts (ids, subject index), target ids, a KL prompt."""

    prompts: list[tuple[list[int], int]]
    target_ids: list[int]
    kl_prompt: tuple[list[int], int] | None = None
    adapter: str | None = None
    #: per prompt, how many leading tokens it shares with other requests' prompts (earlier chat turns); 0 or
    #: missing = none. Rows with the same shared tokens are batched on one cache of them.
    shared: list[int] = field(default_factory=list)
    #: the model's own tokens after prompt 0 + target (without δ), whose distributions δ must keep (KL)
    continuation: list[int] = field(default_factory=list)


@dataclass
class ValueResult:
    deltas: torch.Tensor  # [n, d_out]
    final_nll: torch.Tensor  # per request


@dataclass
class _Row:
    owner: int
    prefix: list[int]  # cached tokens before δ's position (never affected by δ)
    suffix: list[int]  # the rest (+ target): the tokens run each step, up to the last scored position
    loss_pos: list[int]  # positions in the suffix whose next token is scored
    labels: list[int]
    is_kl: bool
    at: int = 0  # δ's position in the suffix (the subject token)
    shared: bool = False  # the prefix is shared with other rows (one batch-1 cache)
    weight: float = 0.0  # a KL row's weight in the loss (target rows: 1 / the owner's number of target rows)


def _rows(requests: list[ValueRequest], kl_weight: float = 0.0, continuation_weight: float = 0.0) -> list[_Row]:
    """Per request: one target row per prompt, the KL row of its neutral prompt (if ``kl_weight``) and the KL row
    of its continuation (if ``continuation_weight``)."""
    rows = []
    for i, request in enumerate(requests):
        for j, (ids, s) in enumerate(request.prompts):
            cut = min(request.shared[j] if j < len(request.shared) else 0, s) or s
            suffix = list(ids[cut:]) + list(request.target_ids[:-1])  # the last target token is only a label
            start = len(ids) - cut - 1
            rows.append(_Row(i, list(ids[:cut]), suffix, list(range(start, start + len(request.target_ids))),
                             list(request.target_ids), False, s - cut, cut < s))
        if kl_weight > 0 and request.kl_prompt is not None:
            ids, s = request.kl_prompt
            rows.append(_Row(i, list(ids[:s]), list(ids[s:]), [len(ids) - s - 1], [-1], True, weight=kl_weight))
        if continuation_weight > 0 and request.continuation and request.prompts:
            ids, s = request.prompts[0]
            suffix = list(ids[s:]) + list(request.target_ids) + list(request.continuation[:-1])
            start = len(ids) - s + len(request.target_ids) - 1  # the last target token predicts c_1
            count = len(request.continuation)
            rows.append(_Row(i, list(ids[:s]), suffix, list(range(start, start + count)), [-1] * count, True,
                             weight=continuation_weight))
    return rows


class _Chunk:
    """A fixed batch of rows with its prefix cache (left-padded prefixes, right-padded suffixes); rows that all
    share one prefix keep a batch-1 cache of it, repeated per forward (``shared``)."""

    def __init__(self, model: nn.Module, rows: list[_Row], index: list[int], pad: int, adapters: list[str] | None,
                 device: torch.device) -> None:
        self.index = index
        self.rows = [rows[i] for i in index]
        self.adapters = adapters
        self.shared = all(r.shared and r.prefix == self.rows[0].prefix for r in self.rows) and (
            adapters is None or len(set(adapters)) == 1)
        width = max(len(r.prefix) for r in self.rows)
        if self.shared:
            prefix_ids = torch.tensor([self.rows[0].prefix])
            prefix_mask = torch.ones(len(self.rows), width, dtype=torch.long)
        elif width:
            prefix_ids, prefix_mask = pad_batch([r.prefix or [pad] for r in self.rows], pad, left=True)
            for j, r in enumerate(self.rows):
                if not r.prefix:
                    prefix_mask[j] = 0
        else:
            prefix_ids = prefix_mask = torch.zeros(len(self.rows), 0, dtype=torch.long)
        suffix_ids, suffix_mask = pad_batch([r.suffix for r in self.rows], pad)
        self.prefix_len = prefix_ids.shape[1]
        self.ids = suffix_ids.to(device)
        self.mask = torch.cat([prefix_mask, suffix_mask], dim=1).to(device)
        positions = (self.mask.cumsum(1) - 1).clamp(min=0)
        self.prefix_positions, self.positions = positions[:, : self.prefix_len], positions[:, self.prefix_len:]
        self.owner = torch.tensor([r.owner for r in self.rows], device=device)
        self.is_kl = torch.tensor([r.is_kl for r in self.rows], device=device)
        self.at = torch.tensor([r.at for r in self.rows], device=device)
        self.flat_rows = torch.tensor([j for j, r in enumerate(self.rows) for _ in r.loss_pos], device=device)
        self.flat_pos = torch.tensor([p for r in self.rows for p in r.loss_pos], device=device)
        self.labels = torch.tensor([y for r in self.rows for y in r.labels], device=device)
        self.cache = None
        if self.prefix_len:
            rows_in = 1 if self.shared else len(self.rows)
            decoder = decoder_of(model)
            with torch.no_grad(), _routing(model, adapters[:rows_in] if adapters else None):
                out = decoder(input_ids=prefix_ids.to(device), attention_mask=self.mask[:rows_in, : self.prefix_len],
                              position_ids=self.prefix_positions[:rows_in], use_cache=True)
            self.cache = getattr(out, cache_argument(type(decoder)))

    def subset(self, keep: torch.Tensor) -> _Chunk:
        """The same chunk restricted to the rows where ``keep`` [rows] is True (prefix cache rows selected)."""
        part = copy.copy(self)
        rows = keep.nonzero().flatten()
        part.index = [self.index[j] for j in rows.tolist()]
        part.rows = [self.rows[j] for j in rows.tolist()]
        part.adapters = None if self.adapters is None else [self.adapters[j] for j in rows.tolist()]
        part.ids, part.mask, part.owner, part.at = self.ids[rows], self.mask[rows], self.owner[rows], self.at[rows]
        part.is_kl = self.is_kl[rows]
        part.positions, part.prefix_positions = self.positions[rows], self.prefix_positions[rows]
        flat = keep[self.flat_rows]
        part.flat_rows = torch.cumsum(keep.long(), 0)[self.flat_rows][flat] - 1  # renumbered rows
        part.flat_pos, part.labels = self.flat_pos[flat], self.labels[flat]
        if self.cache is not None and not self.shared:
            part.cache = copy.deepcopy(self.cache)
            part.cache.batch_select_indices(rows)
        return part

    def log_probs(self, model: nn.Module) -> torch.Tensor:
        """log P at the scored positions, running only the suffix on top of the cached prefix."""
        # the forward appends the suffix to the cache; keep the prefix pristine
        cache = None if self.cache is None else repeated(self.cache, len(self.rows) if self.shared else 1)
        decoder = decoder_of(model)
        with _routing(model, self.adapters):
            hidden = decoder(input_ids=self.ids, attention_mask=self.mask, position_ids=self.positions,
                             use_cache=cache is not None, **{cache_argument(type(decoder)): cache}).last_hidden_state
        head = model.get_base_model().get_output_embeddings()
        return torch.log_softmax(head(hidden[self.flat_rows, self.flat_pos]).float(), dim=-1)

    def losses(self, logp: torch.Tensor, kl_reference: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: mean target NLL (or mean KL(reference ‖ now) for KL rows), and whether greedy decoding
        reproduces the whole target (every target token is the argmax; always True for KL rows).

        Computed for all scored positions at once: ℓ_p = −log P(y_p) or Σ_v P_ref(v) (log P_ref(v) − log P(v)), then
        a per-row mean; indexing logp row by row would cost one [positions, vocab] gradient buffer per row."""
        n = len(self.rows)
        kl_position = self.is_kl[self.flat_rows]
        labels = self.labels.clamp(min=0)  # KL positions carry label −1
        per_position = -logp.gather(1, labels[:, None])[:, 0]
        if bool(kl_position.any()):  # references in flat order: KL rows in row order, each its positions
            reference = torch.cat([kl_reference[self.index[j]] for j in self.is_kl.nonzero().flatten().tolist()])
            at = kl_position.nonzero().flatten()
            kl = (reference.exp() * (reference - logp[at])).sum(-1)
            per_position = per_position.masked_fill(kl_position, 0.0).index_put((at,), kl)
        counts = torch.bincount(self.flat_rows, minlength=n).clamp(min=1)
        loss = per_position.new_zeros(n).index_add(0, self.flat_rows, per_position) / counts
        wrong = (logp.argmax(-1) != labels) & ~kl_position
        greedy = torch.zeros(n, dtype=torch.long, device=logp.device).index_add(0, self.flat_rows, wrong.long()) == 0
        return loss, greedy


def _routing(model: nn.Module, adapters: list[str] | None):
    """Route rows through their adapters (peft's mixed-batch hooks); a no-op context when ``adapters`` is None."""
    from contextlib import nullcontext

    if adapters is None:
        return nullcontext()
    return model.base_model._enable_peft_forward_hooks(adapter_names=adapters)


class _AddDelta:
    """Forward hook: adds δ[owner] at suffix positions at..at+span−1 of each row (the subject token, or a whole
    generation prompt); records the original output at ``at``."""

    def __init__(self, span: int = 1) -> None:
        self.span = span
        self.delta: torch.Tensor | None = None
        self.owner: torch.Tensor | None = None
        self.at: torch.Tensor | None = None
        self.original: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.at is None:  # a prefix forward: δ's positions are all after it
            return output
        rows = torch.arange(output.shape[0], device=output.device)
        self.original = output[rows, self.at].detach().float()
        if self.delta is None:
            return output
        add = torch.zeros_like(output, dtype=self.delta.dtype)
        for j in range(self.span):
            add[rows, self.at + j] = self.delta[self.owner]
        return output + add.to(output.dtype)


def _make_chunks(peft_model: nn.Module, requests: list[ValueRequest], rows: list[_Row], pad: int, batch_size: int,
                 device: torch.device, only: list[int] | None = None) -> list[_Chunk]:
    """Rows (those in ``only``, when given) grouped by shared prefix (each group on one cache; the rest together),
    sorted by (suffix, prefix) length within a group, in chunks of ``batch_size``: similar lengths share one,
    little padding."""
    routed = any(r.adapter is not None for r in requests)
    groups: dict[tuple, list[int]] = {}
    for i in range(len(rows)) if only is None else only:  # one cache per (shared prefix, adapter): computed
        row = rows[i]  # through the adapter
        groups.setdefault((tuple(row.prefix), requests[row.owner].adapter) if row.shared else (), []).append(i)
    chunks = []
    for members in groups.values():
        order = sorted(members, key=lambda r: (len(rows[r].suffix), len(rows[r].prefix)))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            adapters = [requests[rows[i].owner].adapter or BASE_ADAPTER for i in index] if routed else None
            chunks.append(_Chunk(peft_model, rows, index, pad, adapters, device))
    return chunks


def _record(chunk: _Chunk, original: torch.Tensor, logp: torch.Tensor, norms: torch.Tensor,
            kl_reference: dict[int, torch.Tensor]) -> None:
    """From a forward of ``chunk`` without δ (or with δ = 0): ‖v_i‖ = max over i's rows of the original output's
    norm (into ``norms``), and log P at each KL row's positions (into ``kl_reference``)."""
    norms.index_reduce_(0, chunk.owner, original.norm(dim=-1), "amax")
    offset = 0
    for j, r in enumerate(chunk.rows):
        offset += len(r.loss_pos)
        if r.is_kl:
            kl_reference[chunk.index[j]] = logp[offset - len(r.loss_pos):offset].detach()


@torch.no_grad()
def _references(peft_model: nn.Module, hook: _AddDelta, chunks: list[_Chunk], norms: torch.Tensor,
                kl_reference: dict[int, torch.Tensor]) -> None:
    """A forward of every chunk without δ, recorded (:func:`_record`); when the first step runs every row, it
    records them itself instead."""
    hook.delta = None
    for chunk in chunks:
        hook.at = chunk.at
        logp = chunk.log_probs(peft_model)
        _record(chunk, hook.original, logp, norms, kl_reference)


def target_rows(rows: list[_Row]) -> dict[int, list[int]]:
    """Per preference (owner), the indices of its target rows in ``rows``, prompt order (the bare question first)."""
    targets: dict[int, list[int]] = {}
    for j, r in enumerate(rows):
        if not r.is_kl:
            targets.setdefault(r.owner, []).append(j)
    return targets


def sampled_rows(rows: list[_Row], targets: dict[int, list[int]], count: int, generator: torch.Generator
                 ) -> torch.Tensor:
    """Rows one sampled step uses [len(rows)]: per preference its first target row (the bare question), ``count``
    − 1 of its other target rows (``targets``, :func:`target_rows`) drawn at random, and all its KL rows."""
    use = torch.tensor([r.is_kl for r in rows])
    for first, *others in targets.values():
        use[first] = True
        if others and count > 1:
            use[torch.tensor(others)[torch.randperm(len(others), generator=generator)[: count - 1]]] = True
    return use


def _backward(peft_model: nn.Module, hook: _AddDelta, chunks: list[_Chunk], delta: torch.Tensor, done: torch.Tensor,
              kl_reference: dict[int, torch.Tensor], per_owner: torch.Tensor, use: torch.Tensor | None = None,
              norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's gradient of Σ_i (mean NLL_i + λ_KL KL_i + λ_c KL_c,i) over the unfinished preferences' rows (only
    the rows in ``use``, when given; ``per_owner`` counts each preference's target rows among them); returns
    (NLL [n], greedy reproduces every target [n]) over those rows. With ``norms`` (the first step, δ = 0, every
    row), each chunk's forward is also recorded as the reference (:func:`_record`) before its losses."""
    n = delta.shape[0]
    step_nll = torch.zeros(n, device=delta.device)
    step_greedy = torch.ones(n, dtype=torch.bool, device=delta.device)
    for full in chunks:
        active = ~done[full.owner]
        if use is not None:
            active &= use[full.index].to(active.device)
        if not bool(active.any()):
            continue
        chunk = full if bool(active.all()) else full.subset(active)  # finished rows cost nothing
        hook.delta, hook.owner, hook.at = delta, chunk.owner, chunk.at
        logp = chunk.log_probs(peft_model)
        if norms is not None:
            _record(chunk, hook.original, logp, norms, kl_reference)
        losses, greedy = chunk.losses(logp, kl_reference)
        missed = torch.zeros(n, dtype=torch.long, device=delta.device).index_add(0, chunk.owner, (~greedy).long())
        step_greedy &= missed == 0
        kl = chunk.is_kl
        kl_weights = torch.tensor([r.weight for r in chunk.rows], device=delta.device)
        weights = torch.where(kl, kl_weights, 1.0 / per_owner[chunk.owner])
        (losses * weights).sum().backward()
        step_nll.index_add_(0, chunk.owner[~kl], (losses.detach() / per_owner[chunk.owner])[~kl])
    return step_nll, step_greedy


def optimize_values(peft_model: nn.Module, module: nn.Module, requests: list[ValueRequest], pad: int, *,
                    steps: int = 25, lr: float = 0.5, kl_weight: float = 0.0625, weight_decay: float = 1e-3,
                    clamp_norm_factor: float = 4.0, nll_stop: float = 0.25, batch_size: int = 32,
                    progress: bool = True, span: int = 1, continuation_weight: float = 0.0,
                    rows_per_step: int = 0, full_every: int = 5) -> ValueResult:
    """Optimize δ_i for every request jointly (see module docstring). ``module`` = the edit layer; δ_i is
    added at the first ``span`` tokens from each prompt's index (1: the subject token).

    ``rows_per_step`` = k > 0: a step uses, per preference, only k of its prompts (:func:`sampled_rows`: the bare
    question and k − 1 drawn at random; stochastic gradient over prompts), except every ``full_every``-th step
    and the last, which use all of them and alone decide when a preference is finished."""
    device = next(peft_model.parameters()).device
    rows = _rows(requests, kl_weight, continuation_weight)
    n = len(requests)
    hook = _AddDelta(span)
    handle = module.register_forward_hook(hook)
    flags = [p.requires_grad for p in peft_model.parameters()]
    peft_model.requires_grad_(False)
    try:
        chunks = _make_chunks(peft_model, requests, rows, pad, batch_size, device)
        seats = len(rows)  # rows the chunks hold
        norms, kl_reference = torch.zeros(n, device=device), {}

        def is_full(step: int) -> bool:
            return not rows_per_step or step % full_every == full_every - 1 or step == steps - 1

        if not is_full(0):  # otherwise the first step (δ = 0, every row) records them
            _references(peft_model, hook, chunks, norms, kl_reference)
        delta = torch.zeros(n, module.out_features, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=lr)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        nll = torch.full((n,), float("inf"), device=device)
        targets = target_rows(rows)
        every = torch.tensor([len(targets.get(i, ())) for i in range(n)], device=device).clamp(min=1).float()
        sampled = every.clamp(max=max(rows_per_step, 1))  # target rows per preference in a sampled step
        generator = torch.Generator().manual_seed(0)
        for step in tqdm(range(steps), desc="values δ*", disable=not progress, leave=False):
            optimizer.zero_grad()
            full = is_full(step)
            use = None if full else sampled_rows(rows, targets, rows_per_step, generator)
            per_owner = every if full else sampled
            step_nll, step_greedy = _backward(peft_model, hook, chunks, delta, done, kl_reference, per_owner, use,
                                              norms=norms if step == 0 and full else None)
            decay = weight_decay * delta.pow(2).sum(-1) / norms.pow(2).clamp(min=1e-8)
            decay.sum().backward()
            if full:  # only a step over every prompt can finish a preference
                nll = torch.where(done, nll, step_nll)
                done |= (nll < nll_stop) & step_greedy
            if bool(done.all()):
                break
            if full:  # most rows finished: regroup the others into full chunks (fewer, larger forwards)
                finished = done.tolist()
                live = [j for j, r in enumerate(rows) if not finished[r.owner]]
                if len(chunks) > 1 and 2 * len(live) <= seats:
                    hook.delta = hook.at = None
                    chunks, seats = _make_chunks(peft_model, requests, rows, pad, batch_size, device, live), len(live)
            before = delta.detach().clone()
            optimizer.step()
            with torch.no_grad():
                delta[done] = before[done]  # Adam's momentum must not move finished values
                limit = clamp_norm_factor * norms
                delta.mul_((limit / delta.norm(dim=-1).clamp(min=1e-8)).clamp(max=1.0)[:, None])
        return ValueResult(delta.detach(), nll.detach().cpu())
    finally:
        handle.remove()
        for p, flag in zip(peft_model.parameters(), flags):
            p.requires_grad_(flag)
