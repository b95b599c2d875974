"""PNG plots of a results dict: accuracy by method and metric, efficacy vs distractor turns, and the gate-threshold
frontier (generalization / implicit vs locality as the gate thresholds move; matplotlib, Agg)."""

from __future__ import annotations

import math
from pathlib import Path

from .config import METHODS
from .metrics import LOCALITY_METRICS, MULTITURN, QUESTION_METRICS

BAR_METRICS = (*QUESTION_METRICS, *LOCALITY_METRICS)
#: The frontier plot's panels (y metrics) and its x metric.
FRONTIER_PANELS = ("generalization", "implicit")
FRONTIER_X = "locality_neutral"


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


def _frontier_panel(ax, results: dict, metric: str) -> None:
    """One frontier panel: ``metric`` vs locality, a line over the offsets per swept method, a point per other."""
    rows = results.get("frontier", [])
    swept = [m for m in METHODS if any(r["method"] == m for r in rows)]
    for method in swept:
        points = sorted((r["gate_offset"], _value(r.get(FRONTIER_X)), _value(r.get(metric)))
                        for r in rows if r["method"] == method)
        color = f"C{METHODS.index(method)}"
        ax.plot([p[1] for p in points], [p[2] for p in points], marker="o", color=color,
                label=f"{method} (τ + offset)")
        for offset, x, y in points:
            ax.annotate(f"{offset:+g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color,
                        weight="bold" if offset == 0 else "normal")
    summary = {(r["method"], r["metric"]): r["exact"] for r in results["summary"]
               if r["protocol"] == "single" and r["turns"] == 0}
    for method in (m for m in METHODS if m not in swept and (m, FRONTIER_X) in summary):
        ax.scatter([_value(summary[(method, FRONTIER_X)])], [_value(summary.get((method, metric)))], marker="s",
                   s=40, color=f"C{METHODS.index(method)}", label=method, zorder=3)
    ax.set_xlabel(f"{FRONTIER_X} (share of outputs unchanged)")
    ax.set_ylabel(f"{metric} (target in answer)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)


def plot_frontier(results: dict, path: Path) -> Path | None:
    """Generalization and implicit (exact) vs locality_neutral, protocol ``single``: each swept method as a line
    over its gate-threshold offsets (annotated; +0 = the main run), every other method as one point."""
    if not results.get("frontier"):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(FRONTIER_PANELS), figsize=(5.2 * len(FRONTIER_PANELS), 4.4), squeeze=False)
    for ax, metric in zip(axes[0], FRONTIER_PANELS):
        _frontier_panel(ax, results, metric)
        ax.set_title(f"{metric} vs locality")
    axes[0, 0].legend(fontsize=8, loc="best")
    fig.suptitle(f"gate-threshold frontier, protocol single ({results['users'].get('single', 0)} users)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_results(results: dict, out: Path) -> list[Path]:
    """``accuracy.png`` and, when run, ``multiturn.png`` (multi-turn) and ``frontier.png`` (gate sweep) in ``out``."""
    paths = [plot_accuracy(results, out / "accuracy.png"), plot_multiturn(results, out / "multiturn.png"),
             plot_frontier(results, out / "frontier.png")]
    return [p for p in paths if p is not None]
