"""Loading PERSEDIT adapters: one call that registers the type and loads, with errors that name the cause."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from peft import PeftModel
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel

from .peft_type import PERSEDIT

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")


def check_adapter_dir(path: str | os.PathLike) -> Path:
    """Validate a local adapter directory: config present, of type PERSEDIT, weights present."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not an adapter directory: {CONFIG_NAME} is missing")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: malformed JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{config_file}: not UTF-8 text (is it a JSON file?)") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got a JSON {type(config).__name__}")
    if config.get("peft_type") != PERSEDIT.value:
        raise ValueError(
            f"{config_file}: peft_type is {config.get('peft_type')!r}, expected {PERSEDIT.value!r} "
            "(this is not a PERSEDIT adapter)"
        )
    weights = next((path / name for name in WEIGHTS_NAMES if (path / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{str(path)!r} has {CONFIG_NAME} but no adapter weights ({WEIGHTS_NAMES[0]})")
    check_weights_file(weights)
    return path


def check_weights_file(weights: Path) -> None:
    """Raise ``ValueError`` naming ``weights`` if it is empty, or a safetensors file whose header or data is cut."""
    if weights.stat().st_size == 0:
        raise ValueError(f"{weights}: the file is empty (0 bytes)")
    if weights.suffix != ".safetensors":
        return
    try:
        with safe_open(weights, framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights}: truncated or not a safetensors file ({err})") from None


def looks_local(path: str | os.PathLike) -> bool:
    """Whether ``path`` means a local folder rather than a Hub repo id: it exists, is a ``Path``, starts with
    ``./``, ``../``, ``/`` or ``~``, has more than two components, or its first component is a local folder."""
    if not isinstance(path, str) or Path(path).exists():
        return True
    parts = Path(path).parts
    return path.startswith((".", "/", "~", "\\")) or len(parts) > 2 or (len(parts) > 1 and Path(parts[0]).is_dir())


def from_pretrained(base_model: PreTrainedModel, path_or_repo: str | os.PathLike, **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained`` for PERSEDIT adapters, with the type registered and the directory checked.

    ``path_or_repo`` is a local directory or a Hub repo id (downloaded by huggingface_hub when online). A path
    that :func:`looks_local` is checked here and never sent to the Hub, so a missing folder fails at once with
    ``FileNotFoundError`` (for a Hub repo whose owner is also a local folder name, use
    ``PeftModel.from_pretrained``).
    """
    if looks_local(path_or_repo):
        path_or_repo = check_adapter_dir(Path(path_or_repo).expanduser())
    return PeftModel.from_pretrained(base_model, str(path_or_repo), **kwargs)
