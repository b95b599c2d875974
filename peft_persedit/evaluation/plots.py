"""PNG plots of a results dict: accuracy by method and metric, efficacy vs distractor turns (matplotlib, Agg)."""

from __future__ import annotations

import math
from pathlib import Path

from .config import METHODS
from .metrics import LOCALITY_METRICS, MULTITURN, QUESTION_METRICS

BAR_METRICS = (*QUESTION_METRICS, *LOCALITY_METRICS)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _value(x: float | None) -> float:
    return float("nan") if x is None else x


def plot_accuracy(results: dict, path: Path) -> Path:
    """One panel per protocol: grouped bars (exact) per metric and method, dots = semantic score."""
    plt = _pyplot()
    summary = {(r["protocol"], r["method"], r["metric"], r["turns"]): r for r in results["summary"]}
    protocols = list(results["users"])
    methods = [m for m in METHODS if any(k[1] == m for k in summary)]
    fig, axes = plt.subplots(len(protocols), 1, figsize=(11, 3.6 * len(protocols)), squeeze=False)
    width = 0.8 / max(1, len(methods))
    for ax, protocol in zip(axes[:, 0], protocols):
        for j, method in enumerate(methods):
            rows = [summary.get((protocol, method, m, 0), {}) for m in BAR_METRICS]
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(BAR_METRICS))]
            ax.bar(xs, [_value(r.get("exact")) for r in rows], width, label=method, color=f"C{METHODS.index(method)}")
            ax.scatter(xs, [_value(r.get("semantic")) for r in rows], s=14, color="black", zorder=3,
                       label="semantic" if j == 0 else None)
        ax.set_xticks(range(len(BAR_METRICS)), [m.replace("_", "\n") for m in BAR_METRICS])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("share")
        ax.set_title(f"protocol {protocol} ({results['users'][protocol]} users)")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(ncol=len(methods) + 1, fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_multiturn(results: dict, path: Path) -> Path | None:
    """Efficacy (exact) vs the number of distractor turns, one line per method (protocol ``single``)."""
    rows = [r for r in results["summary"] if r["metric"] == MULTITURN and r["protocol"] == "single"]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in METHODS:
        points = sorted((r["turns"], r["exact"]) for r in rows if r["method"] == method and not math.isnan(r["exact"]))
        if points:
            ax.plot(*zip(*points), marker="o", label=method, color=f"C{METHODS.index(method)}")
    ax.set_xlabel("distractor turns before the question")
    ax.set_ylabel("efficacy (target in answer)")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"multi-turn efficacy ({results['users'].get('single', 0)} users)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_results(results: dict, out: Path) -> list[Path]:
    """``accuracy.png`` and (when multi-turn was run) ``multiturn.png`` in ``out``."""
    paths = [plot_accuracy(results, out / "accuracy.png"), plot_multiturn(results, out / "multiturn.png")]
    return [p for p in paths if p is not None]
