"""A job of the evaluation — one method × protocol — and what runs jobs; shared by :mod:`.harness` and
:mod:`.workers` (the harness runs jobs itself or hands them to the workers, which never import the harness)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .config import EvalConfig
from .metrics import Record


@dataclass
class JobResult:
    """What one job (method × protocol) produced: its records, cost row and stage seconds (wall and CPU); for a
    gate-threshold sweep, its frontier rows and the sweep's records (dicts with ``gate_offset``; kept out of
    ``records`` and so out of the summary)."""

    method: str
    protocol: str
    records: list[Record] = field(default_factory=list)
    cost: dict = field(default_factory=dict)
    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    frontier: list[dict] = field(default_factory=list)
    sweep_records: list[dict] = field(default_factory=list)
    process: int = field(default_factory=os.getpid)  # the process that ran it
    threads: int = field(default_factory=torch.get_num_threads)  # its torch threads

    @property
    def key(self) -> str:
        return f"{self.method}/{self.protocol}"


class JobRunner(Protocol):
    """What runs jobs (the harness): its config, its (method, protocol) jobs in table order, and a picklable
    recipe for a runner in another process that starts from this one's shared state."""

    config: EvalConfig

    @property
    def jobs(self) -> list[tuple[str, str]]: ...

    def run_job(self, name: str, protocol: str) -> JobResult: ...

    def distractors(self) -> None: ...

    def worker_factory(self) -> Callable[[], JobRunner]: ...
