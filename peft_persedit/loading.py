"""Loading PERSEDIT adapters: one call that registers the type and loads, with errors that name the cause."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import PreTrainedModel

from .registration import PERSEDIT

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
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: malformed JSON ({err.msg} at line {err.lineno})") from None
    if config.get("peft_type") != PERSEDIT.value:
        raise ValueError(
            f"{config_file}: peft_type is {config.get('peft_type')!r}, expected {PERSEDIT.value!r} "
            "(this is not a PERSEDIT adapter)"
        )
    if not any((path / name).is_file() for name in WEIGHTS_NAMES):
        raise FileNotFoundError(f"{str(path)!r} has {CONFIG_NAME} but no adapter weights ({WEIGHTS_NAMES[0]})")
    return path


def from_pretrained(base_model: PreTrainedModel, path_or_repo: str | os.PathLike, **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained`` for PERSEDIT adapters, with the type registered and the directory checked.

    ``path_or_repo`` is a local directory or a Hub repo id (downloaded by huggingface_hub when online).
    """
    if Path(path_or_repo).exists() or str(path_or_repo).startswith((".", "/", "~")):
        check_adapter_dir(Path(path_or_repo).expanduser())
    return PeftModel.from_pretrained(base_model, str(path_or_repo), **kwargs)
