"""Writing the results: ``results.json`` (everything), ``results.md`` (method × metric tables and, after a gate
sweep, the frontier table), plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..atomic import write_text_atomic
from .config import METHODS
from .metrics import FRONTIER_METRICS, LOCALITY_METRICS, MULTITURN, QUESTION_METRICS


def _processes(environment: dict) -> str:
    """``"2 torch threads"``, or ``"2 worker processes × 1 torch thread, base in the main process (2)"``."""
    workers = environment.get("workers", 1)
    if workers > 1:
        return (f"{workers} worker processes × {environment['threads_per_worker']} torch thread(s), base in the "
                f"main process ({environment['threads']})")
    return f"{environment['threads']} torch threads"


def _cell(exact: float | None, semantic: float | None = None) -> str:
    def fmt(x: float | None) -> str:
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"

    return fmt(exact) if semantic is None else f"{fmt(exact)} / {fmt(semantic)}"


def _row(summary: dict, protocol: str, method: str, turns: list[int]) -> list[str]:
    """The metric cells of one method's table row."""
    def get(metric: str, n: int = 0) -> dict:
        return summary.get((protocol, method, metric, n), {})

    cells = [_cell(get(m).get("exact"), get(m).get("semantic")) for m in QUESTION_METRICS]
    cells += [_cell(get(MULTITURN, n).get("exact")) for n in turns]
    cells += [_cell(get(m).get("exact")) for m in LOCALITY_METRICS]
    return cells + [_cell(get("efficacy").get("fluency"))]


def frontier_table(results: dict) -> str:
    """Markdown: the gate-threshold sweep, one row per method and offset o (τ_c ← τ_c + o), exact shares;
    ``""`` without a sweep."""
    rows = results.get("frontier") or []
    if not rows:
        return ""
    lines = ["### Gate-threshold frontier (protocol `single`)", "",
             "Every gate threshold moved by the offset o (τ_c ← τ_c + o; o < 0 fires more, +0 is the main run); "
             "exact shares.", "",
             "| method | gate offset | " + " | ".join(FRONTIER_METRICS) + " |",
             "|---" * (len(FRONTIER_METRICS) + 2) + "|"]
    for row in rows:
        cells = [row["method"], f"{row['gate_offset']:+g}", *(_cell(row.get(m)) for m in FRONTIER_METRICS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])


def tables(results: dict) -> str:
    """Markdown: one table per protocol, rows = methods, columns = metrics (exact / semantic) and cost; then the
    gate-threshold frontier when there is one."""
    summary = {(r["protocol"], r["method"], r["metric"], r["turns"]): r for r in results["summary"]}
    cost = {(c["protocol"], c["method"]): c for c in results["cost"]}
    turns = sorted({t for (_, _, m, t) in summary if m == MULTITURN and t > 0})
    lines = []
    for protocol, users in results["users"].items():
        per_user = "1 preference per user" if protocol == "single" else "several preferences per user, one adapter"
        lines += [f"### Protocol `{protocol}` ({users} users; {per_user})", ""]
        head = [*QUESTION_METRICS, *(f"{MULTITURN}@{n}" for n in (turns if protocol == "single" else [])),
                *LOCALITY_METRICS, "fluency", "edit s/user", "peak RSS MB", "adapter B/pref"]
        lines += ["| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for method in (m for m in METHODS if (protocol, m) in cost):
            cells = _row(summary, protocol, method, turns if protocol == "single" else [])
            c = cost[(protocol, method)]
            cells += [f"{c['seconds_per_user']:.2f}", f"{c['peak_rss_mb']:.0f}",
                      f"{c['adapter_bytes_per_preference']:.0f}"]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    frontier = frontier_table(results)
    return "\n".join([*lines, frontier] if frontier else lines)


def markdown(results: dict) -> str:
    config = results["config"]
    scorer = results["semantic_scorer"]
    return "\n".join([
        "# UPQA evaluation", "",
        f"data `{results['data']}` ({results['items']} items, limit {config['limit']}), model "
        f"`{config['model'] or 'embedded SmolLM2-135M-Instruct'}`, turns {config['turns']}, "
        f"max_new_tokens {config['max_new_tokens']}, LoRA {config['lora_steps']} steps lr {config['lora_lr']} "
        f"rank {config['lora_rank']}; total {results['total_seconds']:.0f} s ({_processes(results['environment'])}).",
        "",
        f"Cells: exact (target substring) / semantic ({scorer}). Locality: share of greedy outputs unchanged "
        f"(the first {config['locality_prompts']} neutral prompts, {results['locality_prompts_held_out']} of them "
        f"held out from gate calibration; other users' questions about other attributes), averaged over "
        f"{config['locality_users'] or 'all'} sampled users. multiturn@N: efficacy after N distractor turns. "
        "fluency: mean distinct-3 (distinct / all word trigrams) of the answers to the literal question; lower = "
        "more repetitive. "
        "edit s/user: personalization wall time / users; peak RSS during it; adapter bytes on disk per preference "
        "(ICE: prompt bytes).", "",
        tables(results),
    ])


def write_results(results: dict, out: str | os.PathLike, plots: bool = True) -> list[Path]:
    """``results.json``, ``results.md`` and (``plots``) the PNGs in ``out``; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md"]
    write_text_atomic(paths[0], json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    write_text_atomic(paths[1], markdown(results) + "\n")
    if plots:
        from .plots import plot_results

        paths += plot_results(results, out)
    return paths
