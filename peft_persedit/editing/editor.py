"""PersonalizationEditor: preferences → keys → values → gate → solve → apply, for one or many adapters.

Each preference becomes one cluster in every edit layer of its adapter; entry k of
``config.preferences`` is cluster ``init_clusters + k``, so clusters can be forgotten one by one.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from ..layer import PersEditLinear
from ..peft_type import BASE_ADAPTER
from ..preferences import Preference
from .apply import add_preference_clusters, set_missing_centers
from .chat import chat_text, encode, pad_id, subject_token_index
from .clusters import cluster_members, model_synonyms, request_members
from .decoding import eval_mode, generate_batches
from .gate import GateCalibration, calibrate, cluster_max_scores, leaked_inputs, own_subject_mask
from .keys import KeyPrompts, cluster_keys, layer_inputs
from .report import EditReport, PreferenceResult, StageTimer
from .selftext import chat_turns, context_prefixes
from .solve import solve_clusters
from .statistics import LayerStats, layer_stats
from .value_chunks import common_length
from .values import ValueRequest, optimize_values
from .verify import answer_questions, target_hit

Job = tuple[str, Preference]  # (adapter, preference)


def preferences_from_entries(entries: Iterable[dict]) -> list[Preference]:
    """Preferences from ``config.preferences`` entries (extra keys such as ``kind`` are dropped)."""
    fields = Preference.__dataclass_fields__
    return [Preference.from_dict({k: v for k, v in e.items() if k in fields}) for e in entries]


def find_conflicts(new: Iterable[Preference], held: Iterable[Preference]) -> list[tuple[Preference, Preference]]:
    """(new, held) pairs with the same subject but another target: editing ``new`` would hold both answers."""
    held = list(held)
    return [(p, h) for p in new for h in held if p.id != h.id and p.subject.casefold() == h.subject.casefold()
            and p.target.casefold() != h.target.casefold()]


@dataclass
class _Negatives:
    """Question + answer token sequences used as gate negatives: token t belongs to sequence ``token_owner[t]``,
    ``is_subject[t]``: t is a subject key token of this call's own question; ``same_subject`` [P, C], sequence
    p's question is one of cluster c's questions or asks about one of its subjects; ``same_adapter`` [P, C], p is
    held by c's adapter."""

    answered: list[list[int]]
    token_owner: torch.Tensor
    is_subject: torch.Tensor
    same_subject: torch.Tensor
    same_adapter: torch.Tensor


class PersonalizationEditor:
    """Edits preferences into PERSEDIT adapters of ``peft_model`` (default: its active adapter)."""

    def __init__(self, peft_model: PeftModel, tokenizer: PreTrainedTokenizerBase, adapter_name: str | None = None,
                 progress: bool = True) -> None:
        if not isinstance(peft_model, PeftModel) or not peft_model.base_model.__class__.__name__ == "PersEditModel":
            raise TypeError("PersonalizationEditor needs a PeftModel with a PERSEDIT adapter "
                            "(get_peft_model(model, PersonalizationEditConfig()))")
        self.model = peft_model
        self.tokenizer = tokenizer
        self.adapter = adapter_name or peft_model.active_adapter
        self.progress = progress
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token_id is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    # -------------------------------------------------------------------------------------------- state
    @property
    def config(self):
        return self.model.peft_config[self.adapter]

    @property
    def modules(self) -> dict[str, PersEditLinear]:
        return self.model.base_model.edit_layers()

    @property
    def preferences(self) -> list[Preference]:
        """The preferences the adapter holds (saved with it in ``adapter_config.json``; extra keys such as
        ``kind`` are dropped)."""
        return self.held_preferences(self.adapter)

    def held_preferences(self, adapter: str) -> list[Preference]:
        """The preferences ``adapter`` holds (see :attr:`preferences`)."""
        return preferences_from_entries(self.model.peft_config[adapter].preferences)

    def adapter_config(self, init_clusters: int | None = None):
        """A copy of this adapter's config for a new, empty adapter: no preferences, no (saved) bank sizes — a
        loaded template's must not size the new bank — and ``init_clusters`` when given."""
        config = copy.deepcopy(self.config)
        config.preferences, config.bank_sizes = [], {}
        config._saved_bank_sizes = {}
        if init_clusters is not None:
            config.init_clusters = init_clusters
        return config

    def ensure_adapter(self, adapter: str) -> None:
        """Add ``adapter`` (an empty one, configured as this editor's) unless the model has it."""
        if adapter not in self.model.peft_config:
            self.model.add_adapter(adapter, self.adapter_config())

    # ------------------------------------------------------------------------------------------ editing
    def edit(self, preferences: Iterable[Preference], verify: bool = True, method: str = "rome",
             **options) -> EditReport:
        """Edit ``preferences`` into this editor's adapter; returns per-preference pre/post results.

        ``method="representation"``: self-generated representation edits (:mod:`.representation`, whose
        ``RepresentationOptions`` fields ``options`` may set) instead of the engine (``"rome"``).
        """
        return self.edit_many([(self.adapter, p) for p in preferences], verify=verify, method=method, **options)

    def edit_users(self, users: dict[str, list[Preference]], verify: bool = True, method: str = "rome",
                   **options) -> EditReport:
        """Edit each user's preferences into the adapter named after the user, all in one batched run."""
        jobs = [(user, p) for user, prefs in users.items() for p in prefs]
        return self.edit_many(jobs, verify=verify, method=method, **options)

    def forget(self, pref_id: str, adapter: str | None = None) -> None:
        """Remove one preference (its cluster in every layer); the others stay bit-identical."""
        adapter = adapter or self.adapter
        config = self.model.peft_config[adapter]
        ids = [entry["id"] for entry in config.preferences]
        if pref_id not in ids:
            raise KeyError(f"adapter {adapter!r} holds no preference with id {pref_id!r}; it holds {ids}")
        k = ids.index(pref_id)
        for module in self.modules.values():
            if adapter in module.persedit_A:
                module.remove_clusters(adapter, [config.init_clusters + k])
        config.preferences = [e for i, e in enumerate(config.preferences) if i != k]

    def update(self, preferences: Preference | Iterable[Preference], verify: bool = True, method: str = "rome",
               **options) -> EditReport:
        """Replace the held preferences with the same id or subject (another target) by ``preferences``, or add
        them; one edit run for all."""
        new = [preferences] if isinstance(preferences, Preference) else list(preferences)
        ids = {p.id for p in new}
        held = self.preferences
        stale = [h.id for h in held if h.id in ids] + [h.id for _, h in find_conflicts(new, held)]
        for pref_id in dict.fromkeys(stale):
            self.forget(pref_id)
        return self.edit(new, verify=verify, method=method, **options)

    def edit_many(self, jobs: list[Job], verify: bool = True, method: str = "rome", **options) -> EditReport:
        """The pipeline for (adapter, preference) jobs, batched across all of them."""
        if method not in ("rome", "representation") or (method == "rome" and options):
            raise ValueError(f"unknown edit method {method!r} (choose 'rome' or 'representation') or options "
                             f"{sorted(options)} (only method='representation' takes options)")
        self._check_jobs(jobs)
        if method == "representation":
            from .representation import edit_representation

            return edit_representation(self, jobs, verify=verify, **options)
        lap = StageTimer()
        if not jobs:
            return EditReport([], lap.timings)
        with eval_mode(self.model):
            pre = (answer_questions(self.model, self.tokenizer, [p.question for _, p in jobs],
                                    [BASE_ADAPTER] * len(jobs)) if verify else [""] * len(jobs))
            lap("verify_before")
            members = self.members(jobs)
            lap("clusters")
            contexts, stats = self.key_contexts(), self.neutral_stats()
            lap("statistics")
            values = self._values(jobs, members)
            lap("values")
            taus, fires = self._edit_layers(jobs, members, contexts, values.deltas, stats, lap)
            post = answer_questions(self.model, self.tokenizer, [p.question for _, p in jobs],
                                    [a for a, _ in jobs]) if verify else [""] * len(jobs)
            lap("verify_after")
        results = [
            PreferenceResult(adapter=a, id=p.id, question=p.question, target=p.target, answer_before=b,
                             answer_after=after, hit_before=target_hit(b, p.target),
                             hit_after=target_hit(after, p.target), tau=taus[i], value_nll=float(values.final_nll[i]),
                             cluster_size=len(members[i]), false_fire=fires[i])
            for i, ((a, p), b, after) in enumerate(zip(jobs, pre, post))
        ]
        return EditReport(results, lap.timings, verified=verify)

    def _check_jobs(self, jobs: list[Job]) -> None:
        """Create missing adapters; refuse ids already held, warn about a second target for a held subject."""
        for adapter, pref in jobs:
            self.ensure_adapter(adapter)
            held = self.held_preferences(adapter)
            if pref.id in {h.id for h in held}:
                raise ValueError(f"adapter {adapter!r} already holds preference {pref.id!r}; use update()")
            for _, old in find_conflicts([pref], held):
                warnings.warn(f"adapter {adapter!r} already holds {old.subject!r} → {old.target!r} (id {old.id}); "
                              f"{pref.target!r} is added beside it (use update() to replace it)", stacklevel=4)

    # ---------------------------------------------------------------------------------------- the steps
    def members(self, jobs: list[Job]) -> list[list[tuple[str, str]]]:
        """Cluster (question, subject) pairs per job (synonyms asked of the base model when none are given)."""
        need = [p.subject for _, p in jobs if not p.questions and self.config.synonyms]
        synonyms: dict[str, list[str]] = {}
        if need:
            with self.model.disable_adapter():
                synonyms = model_synonyms(self.model, self.tokenizer, need, self.config.synonyms)
        requests = self.config.request_templates
        return [cluster_members(p, synonyms.get(p.subject)) + request_members(p, requests) for _, p in jobs]

    def key_contexts(self) -> list[str]:
        """Contexts of the keys: "" (the bare prompt), then the base model's self-generated prefixes."""
        with self.model.disable_adapter():
            return [""] + context_prefixes(self.model, self.tokenizer, self.config.contexts)

    def neutral_stats(self) -> dict[str, LayerStats] | None:
        """With mom2="self", each edit layer's input statistics (μ, C, samples) from the base model; else None."""
        if self.config.mom2 != "self":
            return None
        with self.model.disable_adapter():
            return layer_stats(self.model, self.tokenizer, self.modules)

    def key_prompt(self, question: str, subject: str, context: str, name: str,
                   history: Sequence[tuple[str, str]] = ()) -> tuple[list[int], int]:
        """Token ids of chat(history, context ⊕ question) and the index of its key token (in ``subject``)."""
        text_q = f"{context} {question}".strip()
        text = chat_text(self.tokenizer, text_q, history=history)
        index = subject_token_index(self.tokenizer, text, question, subject, self.config.key_token, name)
        return encode(self.tokenizer, text), index

    def key_prompts(self, jobs: list[Job], members: list[list[tuple[str, str]]], contexts: list[str]) -> KeyPrompts:
        """Every job's key prompts, job × question × context in order, then job × ``key_histories`` (its own
        question after that many earlier chat turns), the job each belongs to and the leading tokens it shares with
        the others (the system turn; and the earlier turns)."""
        prompts, owner, shared = [], [], []
        lead = self._history_tokens(())
        for i, ((_, pref), cluster) in enumerate(zip(jobs, members)):
            for q, s in cluster:
                for ctx in contexts:
                    prompts.append(self.key_prompt(q, s, ctx, pref.id))
                    owner.append(i)
                    shared.append(lead)
        histories = self.chat_histories(self.config.key_histories, seed=7)
        leads = [self._history_tokens(history) for history in histories]
        for i, ((_, pref), cluster) in enumerate(zip(jobs, members)):
            for history, lead in zip(histories, leads):
                prompts.append(self.key_prompt(*cluster[0], "", pref.id, history))
                owner.append(i)
                shared.append(lead)
        return KeyPrompts(prompts, torch.tensor(owner, dtype=torch.long), shared)

    def chat_histories(self, counts: Sequence[int], seed: int = 0) -> list[list[tuple[str, str]]]:
        """One chat history per entry of ``counts``: that many earlier turns (neutral prompts and the base
        model's own answers, :func:`.selftext.chat_turns`), history h starting at turn 13 h + ``seed``."""
        if not counts:
            return []
        with self.model.disable_adapter():
            turns = chat_turns(self.model, self.tokenizer)
        return [[turns[(13 * h + seed + t) % len(turns)] for t in range(count)] for h, count in enumerate(counts)]

    def _values(self, jobs: list[Job], members: list[list[tuple[str, str]]]):
        """δ per job on its first cluster questions, bare and after ``value_histories`` earlier chat turns (the
        same turns for every job, so their cache is computed once)."""
        requests = []
        histories = self.chat_histories(self.config.value_histories)
        history_tokens = [self._history_tokens(history) for history in histories]  # once per call, not per job
        for (adapter, pref), cluster in zip(jobs, members):
            asked = cluster[: self.config.value_questions] + request_members(pref, self.config.request_templates)
            prompts = [self.key_prompt(q, s, "", pref.id) for q, s in asked]
            shared = [0] * len(prompts)
            for history, tokens in zip(histories, history_tokens):
                prompts.append(self.key_prompt(*cluster[0], "", pref.id, history))
                shared.append(tokens)
            kl_ids = encode(self.tokenizer, f"{pref.subject} is a")
            subject_end = len(encode(self.tokenizer, pref.subject)) - 1
            route = adapter if any(m.num_clusters(adapter) for m in self.modules.values()) else None  # empty = base
            requests.append(ValueRequest(prompts, encode(self.tokenizer, pref.target), (kl_ids, subject_end), route,
                                         shared))
        cfg = self.config
        if cfg.continuation_tokens and cfg.continuation_weight:
            self._continuations(requests, cfg.continuation_tokens)
        last_module = list(self.modules.values())[-1]
        return optimize_values(self.model, last_module, requests, pad_id(self.tokenizer), steps=cfg.value_steps,
                               lr=cfg.value_lr, kl_weight=cfg.kl_weight, weight_decay=cfg.value_weight_decay,
                               clamp_norm_factor=cfg.clamp_norm_factor, progress=self.progress,
                               continuation_weight=cfg.continuation_weight, rows_per_step=cfg.value_rows_per_step,
                               warmup=cfg.value_warmup_steps)

    def _continuations(self, requests: list[ValueRequest], tokens: int) -> None:
        """Each request's ``continuation``: the greedy tokens its adapter (as it is before this edit) says after
        prompt 0 and the target, up to and including an end-of-turn token (run inside :meth:`edit_many`, which
        holds the model in eval mode, as mixed-adapter generation needs)."""
        stops = {pad_id(self.tokenizer), self.tokenizer.eos_token_id}
        prompts = [list(r.prompts[0][0]) + list(r.target_ids) for r in requests]
        adapters = [r.adapter or BASE_ADAPTER for r in requests]
        new = [row for batch, _ in generate_batches(self.model, self.tokenizer, prompts, max_new_tokens=tokens,
                                                    batch_size=32, adapters=adapters) for row in batch.tolist()]
        for request, row in zip(requests, new):
            end = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
            request.continuation = row[:end]

    def _history_tokens(self, history: Sequence[tuple[str, str]]) -> int:
        """How many leading tokens every chat after ``history`` shares (whatever the question that follows)."""
        a, b = (encode(self.tokenizer, chat_text(self.tokenizer, q, history=history)) for q in ("a", "b"))
        return common_length([a, b])

    def _held(self, adapters: list[str], exclude: set[str]) -> list[tuple[str, Preference]]:
        """(adapter, preference) for what ``adapters`` already hold (before this edit), minus the ids in ``exclude``."""
        return [(adapter, p) for adapter in dict.fromkeys(adapters) for p in self.held_preferences(adapter)
                if p.id not in exclude]

    def _negatives(self, jobs: list[Job], members: list[list[tuple[str, str]]]) -> _Negatives:
        """Every token of each question + its answer — this call's and those the adapters already hold (a new
        cluster must not fire on an earlier preference) — with what the gate needs to mask them per cluster."""
        answered, subject_pos, negative_jobs = [], [], []
        for (adapter, pref), cluster in zip(jobs, members):
            ids, index = self.key_prompt(pref.question, cluster[0][1], "", pref.id)
            answered.append(ids + encode(self.tokenizer, pref.target))
            subject_pos.append(index)
            negative_jobs.append((adapter, pref))
        for adapter, pref in self._held([a for a, _ in jobs], {p.id for _, p in jobs}):
            ids = encode(self.tokenizer, chat_text(self.tokenizer, pref.question))
            answered.append(ids + encode(self.tokenizer, pref.target))
            subject_pos.append(-1)  # held questions are never this call's own: every token is a negative
            negative_jobs.append((adapter, pref))
        token_owner = torch.cat([torch.full((len(t),), j) for j, t in enumerate(answered)])
        token_pos = torch.cat([torch.arange(len(t)) for t in answered])
        # another user's question about the same subject ("Where does my family live?" for "What's my family
        # like?") is one this cluster's gate should fire on, not a negative
        keyed = [({q for q, _ in cluster}, {s.casefold() for _, s in cluster}) for cluster in members]
        same_subject = torch.tensor([[other.question in questions or other.subject.casefold() in subjects
                                      for questions, subjects in keyed] for _, other in negative_jobs],
                                    dtype=torch.bool)  # [P, C]
        # only a leak into the cluster's own adapter (or neutral text) can disturb it: rows are routed by adapter
        same_adapter = torch.tensor([[a == b for b, _ in jobs] for a, _ in negative_jobs], dtype=torch.bool)
        return _Negatives(answered, token_owner, token_pos == torch.tensor(subject_pos)[token_owner], same_subject,
                          same_adapter)

    def _gate(self, module: PersEditLinear, stats: LayerStats | None, x: torch.Tensor, owner: torch.Tensor,
              keys: list[torch.Tensor], answers: torch.Tensor, negatives: _Negatives, adapters: list[str]
              ) -> tuple[GateCalibration, list[torch.Tensor] | None]:
        """τ per cluster from its key inputs ``x`` against the neutral samples and the ``answers`` token inputs,
        and the negatives the gate still lets through (None with gate="none": nothing to preserve)."""
        center = stats.mean if stats is not None else torch.zeros(module.in_features)
        set_missing_centers(module, adapters, center)
        unit = [torch.nn.functional.normalize(k - center, dim=-1) for k in keys]
        positives = [cluster_max_scores(x[owner == i], center, [unit[i]])[:, 0] for i in range(len(adapters))]
        neutral = stats.samples if stats is not None else torch.zeros(0, module.in_features)
        neg_inputs = torch.cat([neutral, answers])
        neg_scores = cluster_max_scores(neg_inputs, center, unit)
        usable = own_subject_mask(neutral.shape[0], negatives.token_owner, negatives.is_subject,
                                  negatives.same_subject)
        calibration = calibrate(positives, neg_scores, self.config.false_fire_rate, usable)
        if self.config.gate == "none":  # ungated deltas fire everywhere: plain ROME/MEMIT
            return calibration, None
        own_adapter = usable & torch.cat([torch.ones(neutral.shape[0], len(adapters), dtype=torch.bool),
                                          negatives.same_adapter[negatives.token_owner]])
        return calibration, leaked_inputs(neg_inputs, neg_scores, own_adapter, calibration.tau,
                                          self.config.preserve_leaks)

    def _edit_layers(self, jobs: list[Job], members: list[list[tuple[str, str]]], contexts: list[str],
                     deltas: torch.Tensor, stats: dict[str, LayerStats] | None, lap: StageTimer
                     ) -> tuple[list[float], list[float]]:
        """Per layer in order (later keys see earlier edits): keys → gate → solve (preserving what the gate lets
        through, each layer δ_i / L) → apply. Returns the last layer's τ and false-fire rate per job."""
        pad, share = pad_id(self.tokenizer), 1.0 / len(self.modules)
        adapters = [a for a, _ in jobs]
        prompts, owner, shared = self.key_prompts(jobs, members, contexts)
        negatives = self._negatives(jobs, members)
        taus, fires = [0.0] * len(jobs), [0.0] * len(jobs)
        for name, module in self.modules.items():
            x = layer_inputs(self.model, [module], [p[0] for p in prompts], pad, [p[1] for p in prompts],
                             desc=f"keys {name}" if self.progress else None, shared=shared)[0]
            answers = layer_inputs(self.model, [module], negatives.answered, pad)[0]
            keys = cluster_keys(x, owner, [len(c) for c in members], len(contexts), self.config.max_keys_per_cluster,
                                len(self.config.key_histories))
            lap("keys")
            stat = stats[name] if stats is not None else None
            calibration, leaks = self._gate(module, stat, x, owner, keys, answers, negatives, adapters)
            lap("gate")
            c_inv = stat.inverse() if stat is not None else None
            A, B = solve_clusters(keys, deltas * share, c_inv, self.config.ridge, leaks)
            lap("solve")
            add_preference_clusters(module, adapters, keys, calibration.tau, A, B)
            taus, fires = calibration.tau.tolist(), calibration.false_fire.tolist()
            lap("apply")
        for adapter, pref in jobs:
            self.model.peft_config[adapter].preferences.append(pref.to_dict())
        return taus, fires
