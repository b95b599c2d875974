"""The UPQA evaluation harness: every method × protocol through the same prompts, chat template and scoring.

For each job — a method (a fresh copy of the base model each) in a protocol: personalize all users (timed,
peak memory, adapter bytes), generate every metric's question for every user in mixed batches (row i through
its user's route), score, then check locality for a sample of users; for a method with gates (persedit) in
protocol ``single``, repeat the questions (no multi-turn) and locality with every gate threshold moved by each
offset of ``config.gate_sweep`` (the accuracy/locality frontier). Unpersonalized generations are cached
by chat across methods (the base model's output does not depend on the method). With ``workers`` > 1 the
jobs run in that many processes (:mod:`.workers`).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch
from tqdm.auto import tqdm

from ..data_paths import dataset_path
from ..editing.selftext import HELD_OUT_PROMPTS
from ..peft_type import BASE_ADAPTER
from ..preferences import Preference, load_preferences
from ..prompts import load_prompt_set
from .config import EvalConfig
from .distractors import Pair, history, load_fillers, model_distractors
from .generation import Chat, Generation, generate_chats, greedy_unchanged, make_chat
from .jobs import JobResult
from .judge import JudgeItem, LLMJudge
from .memory import PeakMemory
from .methods import Method, build_method
from .metrics import MULTITURN, QUESTION_METRICS, Record, frontier, summarize
from .scoring import overlap, target_hit, word_match
from .users import Users, grouped_users, round_robin, single_users, spread
from .workers import run_in_workers


def other_questions(users: Users, user: str) -> list[str]:
    """Distinct questions of other users about subjects (and with questions) ``user`` does not have."""
    own = users[user]
    subjects = {p.subject.lower() for p in own}
    questions = {q.lower() for p in own for q in p.cluster_questions()}
    found = [p.question for u, prefs in users.items() if u != user for p in prefs
             if p.subject.lower() not in subjects and p.question.lower() not in questions]
    return list(dict.fromkeys(found))


class Harness:
    """State shared across jobs: data, users per protocol, distractor turns, the reference cache."""

    def __init__(self, config: EvalConfig, pairs: list[Pair] | None = None,
                 cache: dict[Chat, Generation] | None = None) -> None:
        """``pairs`` / ``cache``: distractor turns and unpersonalized generations to start from (a worker's)."""
        self.config = config
        self.prefs: list[Preference] = round_robin(load_preferences(dataset_path(config.data)), config.limit)
        if pairs is None and config.fillers:
            pairs = load_fillers(config.fillers)
        self.pairs: list[Pair] | None = pairs
        self.protocols: dict[str, Users] = {}
        for protocol in config.protocols:
            users = single_users(self.prefs) if protocol == "single" else grouped_users(self.prefs, config.group_size)
            if users:
                self.protocols[protocol] = users
        self.neutral = load_prompt_set("neutral_prompts")[: config.locality_prompts]
        self.cache: dict[Chat, Generation] = cache if cache is not None else {}  # unpersonalized, by chat
        self.records: list[Record] = []
        self.costs: list[dict] = []
        self.frontier: list[dict] = []  # gate-sweep rows (offset 0 = the main run)
        self.sweep_records: list[dict] = []  # the sweep's records (not in the summary), with their gate_offset
        self.timings: dict[str, dict[str, float]] = {}  # job → stage → wall seconds
        self.cpu: dict[str, dict[str, float]] = {}  # job → stage → process CPU seconds (all threads)

    @property
    def jobs(self) -> list[tuple[str, str]]:
        """(method, protocol) pairs in table order."""
        return [(m, p) for m in self.config.methods for p in self.protocols]

    def distractors(self, method: Method | None = None) -> None:
        """The default distractor turns (the base model's own answers), once, when multi-turn needs them."""
        if self.pairs is None and any(n > 0 for n in self.config.turns):
            owned = method is None
            method = method or build_method("base", self.config)
            self.pairs = model_distractors(method.model, method.tokenizer, batch_size=self.config.batch_size)
            if owned:
                method.close()

    def worker_factory(self) -> Callable[[], Harness]:
        """A picklable recipe for a worker process's harness: this config (one process, no progress bars), and
        this harness's distractor turns and cache to start from."""
        return partial(Harness, replace(self.config, workers=1, progress=False), self.pairs, self.cache)

    # ---------------------------------------------------------------------------------------- generation
    def _chat(self, method: Method, user: str | None, question: str, turns: int = 0) -> tuple[Chat, str | None]:
        route = method.route(user)
        return make_chat(question, route.system, history(self.pairs or [], turns)), route.adapter

    def generate(self, method: Method, rows: list[tuple[str | None, str, int]], desc: str) -> list[Generation]:
        """Greedy answers for (user, question, turns) rows; unpersonalized ones come from / go to the cache."""
        requests = [self._chat(method, *row) for row in rows]
        todo = [i for i, (chat, adapter) in enumerate(requests)
                if adapter not in (None, BASE_ADAPTER) or chat not in self.cache]
        new = generate_chats(method.model, method.tokenizer, [requests[i][0] for i in todo],
                             [requests[i][1] for i in todo] if method.routed else None,
                             max_new_tokens=self.config.max_new_tokens, batch_size=self.config.batch_size,
                             desc=desc if self.config.progress else None)
        out: dict[int, Generation] = dict(zip(todo, new))
        for i, (chat, adapter) in enumerate(requests):
            if adapter in (None, BASE_ADAPTER):
                if i in out:
                    self.cache.setdefault(chat, out[i])
                out[i] = self.cache[chat]
        return [out[i] for i in range(len(rows))]

    # ------------------------------------------------------------------------------------------- metrics
    def questions(self, method: Method, protocol: str, users: Users, multiturn: bool = True,
                  tag: str = "") -> list[Record]:
        """Every question metric (and, with ``multiturn``, multi-turn efficacy in the single protocol) for every
        preference; ``tag`` marks the progress bar."""
        rows, meta = [], []
        distractor_turns = [n for n in self.config.turns if n > 0] if protocol == "single" and multiturn else []
        for user, prefs in users.items():
            for pref in prefs:
                for metric, attribute in QUESTION_METRICS.items():
                    if getattr(pref, attribute):
                        rows.append((user, getattr(pref, attribute), 0))
                        meta.append((user, pref, metric))
                for n in distractor_turns:
                    rows.append((user, pref.question, n))
                    meta.append((user, pref, MULTITURN))
        answers = self.generate(method, rows, f"{method.name}/{protocol}{tag}: answers")
        return [Record(protocol, method.name, user, pref.id, metric, turns, question, pref.target, gen.text,
                       target_hit(gen.text, pref.target), overlap(gen.text, pref.target),
                       word_match(gen.text, pref.target), gen.seconds)
                for (user, pref, metric), (_, question, turns), gen in zip(meta, rows, answers)]

    def locality(self, method: Method, protocol: str, users: Users, tag: str = "") -> list[Record]:
        """For sampled users: is each neutral prompt's / other question's greedy output unchanged?"""
        sample = spread(list(users), self.config.locality_users)
        probes = [(u, q, "locality_neutral") for u in sample for q in self.neutral]
        probes += [(u, q, "locality_other") for u in sample for q in other_questions(users, u)]
        if not probes:
            return []
        reference = self.generate(method, [(None, q, 0) for _, q, _ in probes], f"{method.name}/{protocol}: reference")
        requests = [self._chat(method, u, q) for u, q, _ in probes]
        unchanged = greedy_unchanged(method.model, method.tokenizer, [c for c, _ in requests],
                                     [g.ids for g in reference], [a for _, a in requests] if method.routed else None,
                                     batch_size=self.config.batch_size,
                                     desc=f"{method.name}/{protocol}{tag}: locality" if self.config.progress else None)
        return [Record(protocol, method.name, user, "", metric, 0, question, "", ref.text, same)
                for (user, question, metric), ref, same in zip(probes, reference, unchanged)]

    def gate_sweep(self, method: Method, protocol: str, users: Users) -> dict[float, list[Record]]:
        """Offset o → the question (no multi-turn) and locality records with every gate threshold τ + o, for each
        non-zero o of ``config.gate_sweep`` (o = 0 is the main run)."""
        sweep: dict[float, list[Record]] = {}
        for offset in (o for o in self.config.gate_sweep if o != 0):
            tag = f" τ{offset:+g}"
            with method.shifted_gates(offset):
                sweep[offset] = self.questions(method, protocol, users, multiturn=False, tag=tag)
                sweep[offset] += self.locality(method, protocol, users, tag=tag)
        return sweep

    def sweeps(self, method: Method, protocol: str) -> bool:
        """Whether ``method``'s job in ``protocol`` runs the gate-threshold sweep."""
        return bool(self.config.gate_sweep) and method.gate_sweep and protocol == "single"

    # ---------------------------------------------------------------------------------------------- run
    def run_job(self, name: str, protocol: str) -> JobResult:
        """Personalize ``protocol``'s users with method ``name``, then answer every question and check locality
        (and, where :meth:`sweeps`, the gate-threshold sweep: ``job.frontier``, ``job.sweep_records``)."""
        users = self.protocols[protocol]
        job = JobResult(name, protocol)
        clock: dict[str, tuple[float, float]] = {}  # stage → (wall, process CPU) at its start

        def mark(stage: str) -> None:
            clock[stage] = (time.perf_counter(), time.process_time())

        mark("load")
        method = build_method(name, self.config)
        self.distractors(method)
        mark("personalize")
        with PeakMemory() as memory:
            method.personalize(users)
        mark("questions")
        job.records = self.questions(method, protocol, users)
        mark("locality")
        job.records += self.locality(method, protocol, users)
        if self.sweeps(method, protocol):
            mark("gate_sweep")
            sweep = self.gate_sweep(method, protocol, users)
            job.frontier = frontier(protocol, name, {0.0: job.records, **sweep})
            job.sweep_records = [{**r.to_dict(), "gate_offset": o} for o, records in sweep.items() for r in records]
        mark("end")
        stages = list(clock)
        job.wall, job.cpu = ({s: round(clock[t][kind] - clock[s][kind], 3) for s, t in zip(stages, stages[1:])}
                             for kind in (0, 1))
        seconds = clock["questions"][0] - clock["personalize"][0]
        first = next(iter(users))
        stored = method.adapter_bytes(first)
        job.cost = {
            "protocol": protocol, "method": name, "users": len(users), "preferences": sum(map(len, users.values())),
            "seconds": round(seconds, 3), "seconds_per_user": seconds / len(users),
            "cpu_seconds": job.cpu["personalize"], "peak_rss_mb": round(memory.peak_mb, 1),
            "rss_delta_mb": round(memory.delta_mb, 1),
            "adapter_bytes": stored, "adapter_bytes_per_preference": stored / len(users[first]), **method.info}
        method.close()
        return job

    def add(self, job: JobResult) -> None:
        """Keep a finished job's records, cost and timings."""
        self.records += job.records
        self.costs.append(job.cost)
        self.frontier += job.frontier
        self.sweep_records += job.sweep_records
        self.timings[job.key], self.cpu[job.key] = job.wall, job.cpu

    def judge(self) -> None:
        """Replace the overlap-based ``semantic`` column by an LLM judge's verdicts."""
        scored = [r for r in self.records if r.metric in QUESTION_METRICS or r.metric == MULTITURN]
        by_id = {p.id: p for p in self.prefs}
        judge = LLMJudge(self.config.judge, self.config.device, progress=self.config.progress)
        items = [JudgeItem("relevance" if r.metric == "product" else "match", r.question, r.target,
                           by_id[r.item].subject, r.answer) for r in scored]
        for record, verdict in zip(scored, judge.verdicts(items)):
            record.semantic = verdict

    def run(self) -> dict:
        start, cpu = time.perf_counter(), time.process_time()
        elsewhere: list[JobResult] = []  # jobs run in worker processes
        if self.config.workers > 1 and len(self.jobs) > 1:
            finished = {job.key: job for job in run_in_workers(self)}
            elsewhere = [job for job in finished.values() if job.process != os.getpid()]
            for name, protocol in self.jobs:  # table order, whichever finished first
                self.add(finished[f"{name}/{protocol}"])
        else:
            for name, protocol in tqdm(self.jobs, desc="methods", disable=not self.config.progress):
                self.add(self.run_job(name, protocol))
        if self.config.judge:
            clock = time.perf_counter()
            self.judge()
            self.timings["judge"] = {"judge": round(time.perf_counter() - clock, 3)}
        return {
            "config": self.config.to_dict(),
            "data": str(dataset_path(self.config.data)),
            "items": len(self.prefs),
            "users": {p: len(u) for p, u in self.protocols.items()},
            "semantic_scorer": f"judge:{self.config.judge}" if self.config.judge else "word_overlap>=0.5",
            "locality_prompts_held_out": min(len(self.neutral), HELD_OUT_PROMPTS),
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "workers": self.config.workers,
                            "threads_per_worker": min((job.threads for job in elsewhere),
                                                      default=torch.get_num_threads()),
                            "cpus": os.cpu_count(), "machine": platform.machine()},
            "total_seconds": round(time.perf_counter() - start, 1),
            "total_cpu_seconds": round(time.process_time() - cpu  # this process's, and the workers'
                                       + sum(sum(job.cpu.values()) for job in elsewhere), 1),
            "timings": self.timings,
            "cpu_seconds": self.cpu,
            "summary": summarize(self.records),
            "cost": self.costs,
            "frontier": self.frontier,
            "records": [r.to_dict() for r in self.records],
            "frontier_records": self.sweep_records,
        }


def evaluate(config: EvalConfig | None = None, **overrides) -> dict:
    """Run the evaluation and write ``results.json``, ``results.md`` and plots to ``config.out``.

    ``evaluate(data="upqa_balanced100", methods="base,persedit", limit=10, out="out/eval")`` — keyword
    arguments are :class:`EvalConfig` fields (overriding ``config``'s). Returns the results dict.
    """
    from .report import write_results

    config = replace(config, **overrides) if config is not None else EvalConfig(**overrides)
    results = Harness(config).run()
    write_results(results, config.out_dir, plots=config.plots)
    return results
