"""Values: the residual δ_i each preference needs at the edit layer's output, optimized for all at once.

For preference i with training prompts p (subject's last token s_p) and target y:

    δ_i* = argmin  Σ_p −log P(y | p; h_s += δ_i) / |y|  +  λ_KL · KL(P(·|n_i) ‖ P(·|n_i; h_s += δ_i))
                   + λ_wd ‖δ_i‖² / ‖v_i‖²,          subject to ‖δ_i‖ ≤ κ ‖v_i‖

(v_i = the original output at the subject token; n_i = "{subject} is a"). One Adam optimizer holds every
δ_i. Each step runs only the rows' suffixes on prefix caches (:mod:`.value_chunks`). A preference stops as soon
as greedy decoding reproduces its whole target on every prompt and its NLL < ε (what efficacy needs); from then
on its rows (prompts and KL) are dropped from their chunk, and once at most half of the chunks' rows are left
they are regrouped into fuller chunks, so each step costs only the preferences still being optimized.

Once the target is said, δ should let the model go on as it would: with ``continuation`` c (the model's own
greedy tokens after prompt 0 + y, computed without δ), a further KL row adds

    λ_c · (1/|c|) Σ_j KL(P(·|p, y, c_<j) ‖ P(·|p, y, c_<j; h_s += δ_i))

so that an edit strong enough to hold after many chat turns does not derail the rest of the answer.

With ``warmup`` = w, each preference first fits δ_i on its bare question and its prompt after the longest chat
history (and its KL rows) alone (:func:`warmup_rows`), a step costing two of its prompts; from the step after greedy
decoding says its target on both, or from step w, every prompt counts.

With ``rows_per_step`` = k, most steps are stochastic over prompts: each preference's loss is the mean over its
bare question and k − 1 of its other prompts drawn afresh (step cost ∝ k instead of its number of prompts); every
``full_every``-th step and the last use every prompt and decide when a preference is finished.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .frozen_blocks import FrozenBlocks
from .prefix_cache import decoder_of
from .value_chunks import Chunk, Row, ValueRequest, make_chunks, value_rows


@dataclass
class ValueResult:
    deltas: torch.Tensor  # [n, d_out]
    final_nll: torch.Tensor  # per request


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


def _record(chunk: Chunk, original: torch.Tensor, logp: torch.Tensor, norms: torch.Tensor,
            kl_reference: dict[int, torch.Tensor] | None) -> None:
    """From a forward of ``chunk``: ‖v_i‖ = max over i's rows of the original output's norm (into ``norms``; the
    output at δ's own position never depends on δ); and, when the forward ran without δ (or with δ = 0) and
    ``kl_reference`` is given, log P at each KL row's positions (into it)."""
    norms.scatter_reduce_(0, chunk.owner, original.norm(dim=-1), "amax")
    if kl_reference is None:
        return
    offset = 0
    for j, r in enumerate(chunk.rows):
        offset += len(r.loss_pos)
        if r.is_kl:
            kl_reference[chunk.index[j]] = logp[offset - len(r.loss_pos):offset].detach()


@torch.no_grad()
def _references(peft_model: nn.Module, hook: _AddDelta, chunks: list[Chunk], norms: torch.Tensor,
                kl_reference: dict[int, torch.Tensor]) -> None:
    """A forward of every chunk without δ, recorded (:func:`_record`); when the first step runs every row, it
    records them itself instead."""
    hook.delta = None
    for chunk in chunks:
        hook.at = chunk.at
        logp = chunk.log_probs(peft_model)
        _record(chunk, hook.original, logp, norms, kl_reference)


def target_rows(rows: list[Row]) -> dict[int, list[int]]:
    """Per preference (owner), the indices of its target rows in ``rows``, prompt order (the bare question first)."""
    targets: dict[int, list[int]] = {}
    for j, r in enumerate(rows):
        if not r.is_kl:
            targets.setdefault(r.owner, []).append(j)
    return targets


def sampled_rows(rows: list[Row], targets: dict[int, list[int]], count: int, generator: torch.Generator
                 ) -> torch.Tensor:
    """Rows one sampled step uses [len(rows)]: per preference its first target row (the bare question), ``count``
    − 1 of its other target rows (``targets``, :func:`target_rows`) drawn at random, and all its KL rows."""
    use = torch.tensor([r.is_kl for r in rows])
    for first, *others in targets.values():
        use[first] = True
        if others and count > 1:
            use[torch.tensor(others)[torch.randperm(len(others), generator=generator)[: count - 1]]] = True
    return use


def warmup_rows(rows: list[Row], targets: dict[int, list[int]]) -> torch.Tensor:
    """Rows a warming preference runs [len(rows)]: its KL rows, its first target row (the bare question) and its
    target row after the longest shared chat history (the hardest to hold, when it has one)."""
    use = torch.tensor([r.is_kl for r in rows])
    for first, *others in targets.values():
        use[first] = True
        histories = [j for j in others if rows[j].shared]
        if histories:
            use[max(histories, key=lambda j: len(rows[j].prefix))] = True
    return use


def _backward(peft_model: nn.Module, hook: _AddDelta, chunks: list[Chunk], delta: torch.Tensor, done: torch.Tensor,
              kl_reference: dict[int, torch.Tensor], per_owner: torch.Tensor, use: torch.Tensor | None, *,
              norms: torch.Tensor, first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's gradient of Σ_i (mean NLL_i + λ_KL KL_i + λ_c KL_c,i) over the unfinished preferences' rows (only
    the rows in ``use``, when given; ``per_owner`` counts each preference's target rows among them); returns
    (NLL [n], greedy reproduces every target [n]) over those rows. Each chunk's forward also updates ‖v_i‖ in
    ``norms``, and on the ``first`` step (δ = 0, every KL row) it is recorded as the KL reference (:func:`_record`)."""
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
        _record(chunk, hook.original, logp, norms, kl_reference if first else None)
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
                    rows_per_step: int = 0, full_every: int = 5, warmup: int = 0) -> ValueResult:
    """Optimize δ_i for every request jointly (see module docstring). ``module`` = the edit layer; δ_i is
    added at the first ``span`` tokens from each prompt's index (1: the subject token).

    ``rows_per_step`` = k > 0: a step uses, per preference, only k of its prompts (:func:`sampled_rows`: the bare
    question and k − 1 drawn at random; stochastic gradient over prompts), except every ``full_every``-th step
    and the last, which use all of them and alone decide when a preference is finished.

    ``warmup`` = w > 0: in the first w steps a preference runs only its :func:`warmup_rows` until greedy decoding
    says its target on them; from the next step (from step w, and on the last) all its rows, and only then can it
    finish."""
    device = next(peft_model.parameters()).device
    rows = value_rows(requests, kl_weight, continuation_weight)
    n = len(requests)
    hook = _AddDelta(span)
    handle = module.register_forward_hook(hook)
    flags = [p.requires_grad for p in peft_model.parameters()]
    peft_model.requires_grad_(False)
    try:
        frozen = FrozenBlocks(decoder_of(peft_model), module)  # below δ: run once per chunk
        chunks = make_chunks(peft_model, requests, rows, pad, batch_size, device, frozen=frozen)
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
        row_owner = torch.tensor([r.owner for r in rows], dtype=torch.long, device=device)
        alone = warmup_rows(rows, targets).to(device)  # the rows a warming preference runs
        warm_target = alone & ~torch.tensor([r.is_kl for r in rows], device=device)
        warm_rows = torch.bincount(row_owner[warm_target], minlength=n).clamp(min=1).float()  # its target rows there
        warm = (warm_rows < every) & (warmup > 0)  # a preference whose warm-up rows are all its rows does not warm
        for step in tqdm(range(steps), desc="values δ*", disable=not progress, leave=False):
            optimizer.zero_grad()
            full = is_full(step)
            use = None if full else sampled_rows(rows, targets, rows_per_step, generator)
            if step >= warmup or step == steps - 1:
                warm[:] = False
            if bool(warm.any()):
                narrow = alone | ~warm[row_owner]
                use = narrow if use is None else use & narrow
            per_owner = torch.where(warm, warm_rows, every if full else sampled)
            step_nll, step_greedy = _backward(peft_model, hook, chunks, delta, done, kl_reference, per_owner, use,
                                              norms=norms, first=step == 0 and full)  # else: _references did
            decay = weight_decay * delta.pow(2).sum(-1) / norms.pow(2).clamp(min=1e-8)
            decay.sum().backward()
            if full:  # only a step over every prompt can finish a preference
                nll = torch.where(done | warm, nll, step_nll)
                done |= ~warm & (nll < nll_stop) & step_greedy
            warm &= ~step_greedy  # its target is said there: every row from the next step
            if bool(done.all()):
                break
            if full and len(chunks) > 1:  # most rows finished: regroup the others into fuller chunks
                finished = done.tolist()
                live = [j for j, r in enumerate(rows) if not finished[r.owner]]
                if 2 * len(live) <= seats:
                    hook.delta = hook.at = None
                    chunks, seats = make_chunks(peft_model, requests, rows, pad, batch_size, device, live,
                                                  frozen=frozen), len(live)
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
