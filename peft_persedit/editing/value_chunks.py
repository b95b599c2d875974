"""The value step's batches: one row per (preference, prompt) or KL prompt, and chunks of rows on prefix caches.

Tokens before δ's position never see δ, so their key/value cache is computed once and each step runs only a row's
suffix (from the subject token to the last scored position). Rows after the same earlier chat turns
(``ValueRequest.shared``) share one batch-1 cache of those turns, repeated per forward: long histories cost one
prefill per call and no memory per preference. The leading tokens all of a chunk's other rows start with (the chat
template's system turn) run once too, and each row extends that cache with its own rest.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ..peft_type import BASE_ADAPTER
from .chat import pad_batch
from .frozen_blocks import FrozenBlocks, select_rows
from .prefix_cache import cache_argument, decoder_of, grouped_query_attention, repeated


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
class Row:
    owner: int
    prefix: list[int]  # cached tokens before δ's position (never affected by δ)
    suffix: list[int]  # the rest (+ target): the tokens run each step, up to the last scored position
    loss_pos: list[int]  # positions in the suffix whose next token is scored
    labels: list[int]
    is_kl: bool
    at: int = 0  # δ's position in the suffix (the subject token)
    shared: bool = False  # the prefix is shared with other rows (one batch-1 cache)
    weight: float = 0.0  # a KL row's weight in the loss (target rows: 1 / the owner's number of target rows)


def value_rows(requests: list[ValueRequest], kl_weight: float = 0.0, continuation_weight: float = 0.0) -> list[Row]:
    """Per request: one target row per prompt, the KL row of its neutral prompt (if ``kl_weight``) and the KL row
    of its continuation (if ``continuation_weight``)."""
    rows = []
    for i, request in enumerate(requests):
        for j, (ids, s) in enumerate(request.prompts):
            cut = min(request.shared[j] if j < len(request.shared) else 0, s) or s
            suffix = list(ids[cut:]) + list(request.target_ids[:-1])  # the last target token is only a label
            start = len(ids) - cut - 1
            rows.append(Row(i, list(ids[:cut]), suffix, list(range(start, start + len(request.target_ids))),
                             list(request.target_ids), False, s - cut, cut < s))
        if kl_weight > 0 and request.kl_prompt is not None:
            ids, s = request.kl_prompt
            rows.append(Row(i, list(ids[:s]), list(ids[s:]), [len(ids) - s - 1], [-1], True, weight=kl_weight))
        if continuation_weight > 0 and request.continuation and request.prompts:
            ids, s = request.prompts[0]
            suffix = list(ids[s:]) + list(request.target_ids) + list(request.continuation[:-1])
            start = len(ids) - s + len(request.target_ids) - 1  # the last target token predicts c_1
            count = len(request.continuation)
            rows.append(Row(i, list(ids[:s]), suffix, list(range(start, start + count)), [-1] * count, True,
                             weight=continuation_weight))
    return rows


class Chunk:
    """A fixed batch of rows with its prefix cache (right-padded suffixes). The leading tokens every row's prefix
    starts with (the chat template's system turn) run once at batch size 1; rows that all share one prefix keep
    that batch-1 cache, repeated per forward (``shared``), the others extend it with their own, left-padded rest.
    With ``frozen`` (the blocks below δ's layer), their output on the suffix is computed here once and replayed by
    every :meth:`log_probs`. ``leads`` keeps the batch-1 caches of leads already computed (by lead tokens and
    adapter), shared by the chunks of one :func:`make_chunks` call."""

    def __init__(self, model: nn.Module, rows: list[Row], index: list[int], pad: int, adapters: list[str] | None,
                 device: torch.device, frozen: FrozenBlocks | None = None, leads: dict | None = None) -> None:
        self.index = index
        self.rows = [rows[i] for i in index]
        self.adapters = adapters
        count = len(self.rows)
        uniform = adapters is None or len(set(adapters)) == 1  # a batch-1 cache is computed through one adapter
        lead = common_length([r.prefix for r in self.rows]) if uniform else 0
        self.shared = uniform and all(r.shared and len(r.prefix) == lead for r in self.rows)
        self.lead = lead
        rest = [r.prefix[lead:] for r in self.rows]
        if any(rest):
            rest_ids, rest_mask = pad_batch([x or [pad] for x in rest], pad, left=True)
            rest_mask[[j for j, x in enumerate(rest) if not x]] = 0
        else:
            rest_ids = rest_mask = torch.zeros(count, 0, dtype=torch.long)
        suffix_ids, suffix_mask = pad_batch([r.suffix for r in self.rows], pad)
        self.prefix_len = lead + rest_ids.shape[1]
        self.ids = suffix_ids.to(device)
        self.mask = torch.cat([torch.ones(count, lead, dtype=torch.long), rest_mask, suffix_mask], dim=1).to(device)
        positions = (self.mask.cumsum(1) - 1).clamp(min=0)
        self.prefix_positions, self.positions = positions[:, : self.prefix_len], positions[:, self.prefix_len:]
        self.owner = torch.tensor([r.owner for r in self.rows], device=device)
        self.is_kl = torch.tensor([r.is_kl for r in self.rows], device=device)
        self.at = torch.tensor([r.at for r in self.rows], device=device)
        self.flat_rows = torch.tensor([j for j, r in enumerate(self.rows) for _ in r.loss_pos], device=device)
        self.flat_pos = torch.tensor([p for r in self.rows for p in r.loss_pos], device=device)
        self.labels = torch.tensor([y for r in self.rows for y in r.labels], device=device)
        self.cache = None
        decoder = decoder_of(model)
        with torch.no_grad():
            if lead:
                key = (tuple(self.rows[0].prefix[:lead]), adapters[0] if adapters else None)
                leads = {} if leads is None else leads
                if key not in leads:  # the lead's positions are 0 … lead − 1 (no padding)
                    with routing(model, adapters[:1] if adapters else None):
                        out = decoder(input_ids=torch.tensor([list(key[0])], device=device),
                                      attention_mask=self.mask[:1, :lead],
                                      position_ids=self.prefix_positions[:1, :lead], use_cache=True)
                    leads[key] = getattr(out, cache_argument(type(decoder)))
                self.cache = leads[key]  # never appended to: every forward runs on a copy
                if not self.shared:
                    self.cache = repeated(self.cache, count)
            if rest_ids.shape[1]:
                with routing(model, adapters):
                    out = decoder(input_ids=rest_ids.to(device), attention_mask=self.mask[:, : self.prefix_len],
                                  position_ids=self.prefix_positions[:, lead:], use_cache=True,
                                  **{cache_argument(type(decoder)): self.cache})
                self.cache = getattr(out, cache_argument(type(decoder)))
        self.frozen = frozen if frozen else None
        self.frozen_output = self.frozen.capture(lambda: self._forward(model)) if self.frozen else None

    def subset(self, keep: torch.Tensor) -> Chunk:
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
        if self.frozen_output is not None:
            part.frozen_output = select_rows(self.frozen_output, rows)
        if self.cache is not None and not self.shared:
            part.cache = copy.deepcopy(self.cache)
            part.cache.batch_select_indices(rows)
        return part

    def _forward(self, model: nn.Module) -> torch.Tensor:
        """The decoder's last hidden states on the suffix, on a copy of the prefix cache (the forward appends to the
        cache it is given; the prefix stays pristine)."""
        cache = None if self.cache is None else repeated(self.cache, len(self.rows) if self.shared else 1)
        decoder = decoder_of(model)
        with routing(model, self.adapters), grouped_query_attention(self.ids.device):
            return decoder(input_ids=self.ids, attention_mask=self.mask, position_ids=self.positions,
                           use_cache=cache is not None, **{cache_argument(type(decoder)): cache}).last_hidden_state

    def log_probs(self, model: nn.Module) -> torch.Tensor:
        """log P at the scored positions, running only the suffix on top of the cached prefix (and only the blocks
        from δ's layer up, when the frozen blocks' output is known)."""
        with nullcontext() if self.frozen_output is None else self.frozen.replay(self.frozen_output):
            hidden = self._forward(model)
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


def common_length(sequences: list[list[int]]) -> int:
    """How many leading tokens all ``sequences`` share."""
    first = sequences[0]
    return next((i for i in range(len(first)) if any(len(x) <= i or x[i] != first[i] for x in sequences)), len(first))


def routing(model: nn.Module, adapters: list[str] | None):
    """Route rows through their adapters (peft's mixed-batch hooks); a no-op context when ``adapters`` is None."""
    if adapters is None:
        return nullcontext()
    return model.base_model._enable_peft_forward_hooks(adapter_names=adapters)


def make_chunks(peft_model: nn.Module, requests: list[ValueRequest], rows: list[Row], pad: int, batch_size: int,
                device: torch.device, only: list[int] | None = None, frozen: FrozenBlocks | None = None
                ) -> list[Chunk]:
    """Rows (those in ``only``, when given) grouped by shared prefix (each group on one cache, computed through the
    group's adapter) and the others by their prefix's first token (those starting with the system turn apart from
    the KL prompts), sorted by (suffix, prefix) length within a group, in chunks of ``batch_size``: similar lengths
    share one, little padding."""
    routed = any(r.adapter is not None for r in requests)
    groups: dict[tuple, list[int]] = {}
    for i in range(len(rows)) if only is None else only:
        row = rows[i]
        key = (tuple(row.prefix), requests[row.owner].adapter) if row.shared else (None, *row.prefix[:1])
        groups.setdefault(key, []).append(i)
    chunks, leads = [], {}
    for members in groups.values():
        order = sorted(members, key=lambda r: (len(rows[r].suffix), len(rows[r].prefix)))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            adapters = [requests[rows[i].owner].adapter or BASE_ADAPTER for i in index] if routed else None
            chunks.append(Chunk(peft_model, rows, index, pad, adapters, device, frozen, leads))
    return chunks
