"""Shared fixtures: tiny models of every architecture, the tiny tokenizer, the embedded model (real_model)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

from tiny_models import make_tiny_model, tiny_tokenizer  # noqa: E402

import peft_persedit  # noqa: E402,F401  (registers PERSEDIT)

collect_ignore = ["kernels_interpret"]


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct (converted once, cached)."""
    from peft_persedit import load_default_model

    return load_default_model()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
