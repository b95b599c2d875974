"""The harness's jobs in W worker processes, longest first: every core busy on a small CPU.

One process with T torch threads leaves cores idle on this workload: a LoRA training step of SmolLM2-135M
on one 40-token sequence takes 0.32 s on 1 thread and still 0.28 s on 2, and greedy decoding of 32 rows
8.4 s vs 5.6 s. W processes with ⌊T / W⌋ threads each run independent jobs side by side instead (measured
on 2 cores: 1.6× the training and 1.3× the decoding throughput of one 2-thread process, the same for long
prefills).

The base method's jobs run first, in this process: they fill the cache of unpersonalized generations
(and the distractor turns) that every worker then starts from. The rest go to a spawn-context
:class:`multiprocessing.pool.Pool` in longest-processing-time-first order (:data:`JOB_WEIGHT`, measured
relative costs), which keeps the workers' finishing times close. A job that raises stops the run (and its
workers) with its error.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .jobs import JobResult, JobRunner

#: Relative wall time of a job by method (UPQA, SmolLM2 on CPU); a grouped job costs ~0.8 of a single one.
JOB_WEIGHT = {"representation": 4.0, "lora": 3.0, "rome": 2.0, "persedit": 4.5, "ice": 1.2, "dpl": 1.0}

_runner: JobRunner | None = None  # the worker process's own harness


def _start_worker(factory: Callable[[], JobRunner], threads: int) -> None:
    """Worker initializer: torch threads, and the harness ``factory`` builds (from the parent's shared state)."""
    global _runner
    torch.set_num_threads(threads)
    _runner = factory()


def _run_job(job: tuple[str, str]) -> JobResult:
    assert _runner is not None, "worker not initialized"
    return _runner.run_job(*job)


def job_weight(name: str, protocol: str) -> float:
    """Expected relative cost of a job (for longest-first scheduling)."""
    return JOB_WEIGHT.get(name, 1.0) * (1.0 if protocol == "single" else 0.8)


def run_in_workers(harness: JobRunner) -> list[JobResult]:
    """Every job of ``harness``: base jobs here, the others in ``config.workers`` processes; in finishing order."""
    config = harness.config
    bar = tqdm(total=len(harness.jobs), desc="methods", disable=not config.progress)
    done: list[JobResult] = []
    for name, protocol in harness.jobs:
        if name == "base":
            done.append(harness.run_job(name, protocol))
            bar.update()
    harness.distractors()
    rest = sorted((job for job in harness.jobs if job[0] != "base"), key=lambda job: -job_weight(*job))
    if rest:
        workers = min(config.workers, len(rest))
        threads = max(1, torch.get_num_threads() // workers)
        pool = multiprocessing.get_context("spawn").Pool(
            workers, initializer=_start_worker, initargs=(harness.worker_factory(), threads))
        try:
            for job in pool.imap_unordered(_run_job, rest):  # chunksize 1: handed out in ``rest`` order
                done.append(job)
                bar.set_postfix_str(job.key)
                bar.update()
            pool.close()
        finally:
            pool.terminate()  # no-op after close() + all results; stops the other jobs when one raised
            pool.join()
    bar.close()
    return done
