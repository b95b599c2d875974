"""Where the evaluation data lives: the repo's ``data/`` (CC-BY-NC-4.0, UPQA/PrefEval), else ``../shared/data``."""

from __future__ import annotations

from pathlib import Path

DATASETS = {
    "upqa_dev": "upqa/upqa_dev.json",
    "upqa_balanced100": "upqa/upqa_balanced100.json",
    "upqa_balanced100_cluster9": "upqa/upqa_balanced100_cluster9.json",
    "prefeval_pro100": "prefeval/prefeval_pro_balanced100.json",
}
REPO_ROOT = Path(__file__).resolve().parent.parent


def dataset_path(name: str) -> Path:
    """Path of a named dataset (see :data:`DATASETS`), or of ``name`` itself when it is an existing file."""
    if Path(name).is_file():
        return Path(name)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)} (or pass a file path)")
    for root in (REPO_ROOT / "data", REPO_ROOT.parent / "shared" / "data"):
        if (root / DATASETS[name]).is_file():
            return root / DATASETS[name]
    raise FileNotFoundError(f"dataset {name!r} not found under {REPO_ROOT / 'data'} or ../shared/data")
