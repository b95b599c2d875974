"""UPQA evaluation harness: base, ICE, LoRA, ROME-per-synonym and persedit in one harness (``persedit eval``).

    from peft_persedit.evaluation import evaluate
    results = evaluate(data="upqa_balanced100", methods="base,ice,persedit", turns="0,2", limit=20, out="out/eval")

writes ``out/eval/results.json`` (every generation, score and timing), ``results.md`` (method × metric
tables) and ``accuracy.png`` / ``multiturn.png``; with the (default) gate-threshold sweep, also a frontier
table and ``frontier.png``. See :class:`EvalConfig` for every setting.
"""

from __future__ import annotations

from .config import METHODS, PROTOCOLS, EvalConfig
from .harness import Harness, evaluate
from .metrics import Record, summarize
from .report import write_results

__all__ = ["METHODS", "PROTOCOLS", "EvalConfig", "Harness", "Record", "evaluate", "summarize", "write_results"]
