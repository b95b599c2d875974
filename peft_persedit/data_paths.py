"""Where the evaluation data lives: the repo's ``data/`` (CC-BY-NC-4.0, UPQA/PrefEval), else ``../shared/data``.

``$PERSEDIT_DATA_DIR``, when set, is searched first.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATASETS", "REPO_ROOT", "data_roots", "dataset_path"]

DATASETS: dict[str, str] = {
    "upqa_dev": "upqa/upqa_dev.json",
    "upqa_balanced100": "upqa/upqa_balanced100.json",
    "upqa_balanced100_cluster9": "upqa/upqa_balanced100_cluster9.json",
    "prefeval_pro100": "prefeval/prefeval_pro_balanced100.json",
}
_ALIASES = {"prefeval_pro_balanced100": "prefeval_pro100"}
REPO_ROOT = Path(__file__).resolve().parent.parent


def data_roots() -> list[Path]:
    """Folders searched, in order: ``$PERSEDIT_DATA_DIR``, the repo's ``data/``, ``../shared/data``."""
    roots = [Path(os.environ["PERSEDIT_DATA_DIR"])] if os.environ.get("PERSEDIT_DATA_DIR") else []
    return roots + [REPO_ROOT / "data", REPO_ROOT.parent / "shared" / "data"]


def dataset_path(name: str | os.PathLike[str]) -> Path:
    """Path of a named dataset (a key of :data:`DATASETS`), or of ``name`` itself when it is an existing file.

    Raises ``ValueError`` for an unknown name and ``FileNotFoundError`` when no data folder holds it.
    """
    if Path(name).is_file():
        return Path(name)
    key = _ALIASES.get(str(name), str(name))
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {str(name)!r}; known: {', '.join(DATASETS)} (or pass a file path)")
    for root in data_roots():
        if (root / DATASETS[key]).is_file():
            return root / DATASETS[key]
    searched = ", ".join(str(root) for root in data_roots())
    raise FileNotFoundError(f"dataset {key!r} ({DATASETS[key]}) not found under: {searched}")
