"""EditReport: what an edit did, per preference, with the time each pipeline stage took (:class:`StageTimer`)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field


class StageTimer:
    """Wall seconds per pipeline stage: ``lap(stage)`` adds the time since the previous lap (or the start) to
    ``timings[stage]``, so a stage run once per layer sums over the layers."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self._clock
        self._clock = now


@dataclass
class PreferenceResult:
    adapter: str
    id: str
    question: str
    target: str
    answer_before: str
    answer_after: str
    hit_before: bool
    hit_after: bool
    tau: float
    value_nll: float
    cluster_size: int
    false_fire: float = 0.0  # share of the gate's calibration negatives it fires on (last edit layer)


@dataclass
class EditReport:
    results: list[PreferenceResult]
    timings: dict[str, float] = field(default_factory=dict)
    verified: bool = True

    @property
    def efficacy(self) -> float:
        """Share of preferences whose greedy answer contains the target after editing."""
        return sum(r.hit_after for r in self.results) / max(1, len(self.results))

    @property
    def efficacy_before(self) -> float:
        return sum(r.hit_before for r in self.results) / max(1, len(self.results))

    @property
    def false_fire(self) -> float:
        """The highest measured gate false-fire rate over the preferences (0 when none)."""
        return max((r.false_fire for r in self.results), default=0.0)

    @property
    def total_seconds(self) -> float:
        return sum(self.timings.values())

    def to_dict(self) -> dict:
        return {"efficacy": self.efficacy, "efficacy_before": self.efficacy_before, "timings": self.timings,
                "results": [asdict(r) for r in self.results]}

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def __str__(self) -> str:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
        head = f"{len(self.results)} preferences"
        if self.verified:
            head += f": efficacy {self.efficacy_before:.2f} → {self.efficacy:.2f}"
        if self.false_fire > 0:
            head += f", gate false-fire ≤ {self.false_fire:.3f}"
        return f"{head} in {self.total_seconds:.1f}s ({stages})"
