"""Shared fixtures: tiny models of every architecture, the tiny tokenizer, the embedded model (real_model).

Torch runs on 2 threads with deterministic seeds. ``OMP_WAIT_POLICY=PASSIVE`` is set before torch loads:
with OpenMP's default spinning, a tiny matmul takes ~30 ms instead of ~30 µs whenever the two cores are
shared with anything else.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)

from tiny_models import TINY_ARCHS, make_tiny_model, tiny_tokenizer  # noqa: E402

import peft_persedit  # noqa: E402,F401  (registers PERSEDIT)

collect_ignore = ["kernels_interpret"]  # runs in its own process, with TRITON_INTERPRET=1


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture(params=TINY_ARCHS)
def tiny_model(request):
    """A tiny random model of each architecture in turn (``tiny_model.config.model_type`` names it)."""
    return make_tiny_model(request.param)


@pytest.fixture
def saved_tiny_base(tmp_path):
    """A tiny llama saved to ``tmp_path / "base"`` and reloaded from there (so adapters record that path)."""
    from transformers import AutoModelForCausalLM

    make_tiny_model("llama").save_pretrained(tmp_path / "base")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny llama and its tokenizer saved in one folder (a local model path for ``--model``)."""
    path = tmp_path_factory.mktemp("tiny")
    for part in (make_tiny_model("llama"), tiny_tokenizer()):
        part.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct (converted once, cached): ``(model, tokenizer)``."""
    from peft_persedit import load_default_model

    return load_default_model()
