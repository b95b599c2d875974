"""EvalConfig: what ``persedit eval`` / :func:`~peft_persedit.evaluation.evaluate` runs, and how cheaply."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: Every method the harness knows, in table order.
METHODS = ("base", "ice", "lora", "rome", "persedit", "representation", "dpl")
#: What a run compares unless told otherwise (representation edits self-generate text: ~50 s per preference).
DEFAULT_METHODS = ("base", "ice", "lora", "rome", "persedit")
#: single: every item is one user (one adapter each); grouped: ``group_size`` items with distinct attribute
#: types and questions per user, in one adapter (interference).
PROTOCOLS = ("single", "grouped")
#: Gate-threshold offsets swept by default (τ_c ← τ_c + o; the main run is o = 0).
DEFAULT_GATE_SWEEP = (-0.3, -0.2, -0.1, -0.05, 0.05)


def parse_list(text: str | list | tuple, kind: type = str) -> list:
    """``"a,b, c"`` → ``["a", "b", "c"]`` (``kind`` converts each entry); lists pass through converted."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    return [kind(p.strip()) if isinstance(p, str) else kind(p) for p in parts if str(p).strip()]


def parse_turns(text: str | list | tuple) -> list[int]:
    """Distractor-turn counts: ``"2,0,2"`` → ``[0, 2]`` (sorted, unique, each ≥ 0)."""
    try:
        turns = sorted(set(parse_list(text, int)))
    except (TypeError, ValueError):
        raise ValueError(f"turns must be comma-separated integers ≥ 0, got {text!r}") from None
    if any(n < 0 for n in turns):
        raise ValueError(f"turns must be ≥ 0, got {turns}")
    return turns


def parse_offsets(text: str | list | tuple) -> list[float]:
    """Gate-threshold offsets: ``"-0.1,0.05,-0.1"`` → ``[-0.1, 0.05]`` (sorted, unique, finite; ``""`` → ``[]``)."""
    try:
        offsets = sorted(set(parse_list(text, float)))
    except (TypeError, ValueError):
        raise ValueError(f"gate_sweep must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(o) for o in offsets):
        raise ValueError(f"gate_sweep offsets must be finite, got {offsets}")
    return offsets


def _is_path(value: str | os.PathLike) -> bool:
    """A value meant as a file rather than a dataset name: a path object, a '/' in it, or a .json/.jsonl name."""
    text = os.fspath(value)
    return isinstance(value, os.PathLike) or "/" in text or os.sep in text or text.endswith((".json", ".jsonl"))


def _check_paths(config: EvalConfig) -> None:
    """Fail before any work: a data or fillers file that does not exist, an ``out`` that is a file."""
    for name in ("data", "fillers"):
        value = getattr(config, name)
        if value is not None and (name == "fillers" or _is_path(value)) and not Path(value).is_file():
            raise FileNotFoundError(f"{name} file not found: {os.fspath(value)}")
    if Path(config.out).exists() and not Path(config.out).is_dir():
        raise FileExistsError(f"out {os.fspath(config.out)!r} is an existing file, not a directory")


@dataclass
class EvalConfig:
    """Settings of one evaluation run (see ``persedit eval --help``).

    Args:
        data: a preference file (UPQA flat/cluster9, PrefEval-pro, JSON/JSONL) or a dataset name of
            :data:`~peft_persedit.data_paths.DATASETS`.
        model: base model (local folder or Hub id); ``None`` = the embedded SmolLM2-135M-Instruct.
        methods / protocols: subsets of :data:`METHODS` (default :data:`DEFAULT_METHODS`) / :data:`PROTOCOLS`.
        turns: distractor-turn counts N of the multi-turn metric (0 = the efficacy question alone).
        limit: keep N items, taken round-robin over attribute types (every type is covered).
        judge: local path / Hub id of a judge model ('1'/'0' answers); ``None`` = content-word overlap.
        fillers: JSON list of ``{"conversation": [{"role", "content"}, ...]}`` used as distractor turns.
        locality_users: users whose locality is measured (evenly spaced; 0 = all).
        locality_prompts: neutral prompts in the locality set (the first ones: held out from calibration).
        lora_steps / lora_lr / lora_rank: the LoRA baseline (transformers.Trainer, loss on answer tokens).
        gate_sweep: offsets o added to every gate threshold τ (τ_c ← τ_c + o) of methods with gates (persedit,
            representation), protocol ``single`` only: each re-answers the efficacy, generalization, implicit and
            product questions and re-checks locality, giving ``results["frontier"]`` (o = 0 is the main run).
            Empty: no sweep.
        workers: processes that run the jobs (method × protocol), each with torch threads ÷ workers; 2 on a
            2-core CPU keeps both cores busy (:mod:`.workers`). Each needs ~2.5 GB for SmolLM2-135M. Workers
            are spawned: a script calling :func:`evaluate` with workers > 1 needs ``if __name__ == "__main__":``.
    """

    data: str | os.PathLike = "upqa_balanced100"
    out: str | os.PathLike = "out/eval"
    model: str | None = None
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    turns: list[int] = field(default_factory=lambda: [0, 2, 4, 6, 8, 10])
    limit: int | None = None
    judge: str | None = None
    fillers: str | os.PathLike | None = None
    group_size: int = 10
    max_new_tokens: int = 24
    batch_size: int = 32
    locality_users: int = 10
    locality_prompts: int = 50
    lora_steps: int = 20
    lora_lr: float = 1e-3
    lora_rank: int = 8
    gate_sweep: list[float] = field(default_factory=lambda: list(DEFAULT_GATE_SWEEP))
    device: str = "cpu"
    workers: int = 1
    plots: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.methods = parse_list(self.methods)
        self.protocols = parse_list(self.protocols)
        self.turns = parse_turns(self.turns)
        self.gate_sweep = parse_offsets(self.gate_sweep)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {unknown or '(none given)'}; choose from {', '.join(METHODS)}")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise ValueError(f"unknown protocol(s) {bad or '(none given)'}; choose from {', '.join(PROTOCOLS)}")
        self.methods = [m for m in METHODS if m in self.methods]
        for name in ("limit", "group_size", "max_new_tokens", "batch_size", "lora_steps", "lora_rank", "workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be ≥ 1, got {value}")
        if self.locality_users < 0 or self.locality_prompts < 0:
            raise ValueError("locality_users and locality_prompts must be ≥ 0")
        _check_paths(self)

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict:
        """JSON-safe settings (paths as strings)."""
        return {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in asdict(self).items()}
