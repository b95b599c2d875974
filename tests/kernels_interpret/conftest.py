"""Triton kernel tests, run in their own process (the main ``pytest tests`` run ignores this folder).

``TRITON_INTERPRET`` must be in effect before ``triton`` is first imported (triton.language's own @jit helpers,
tl.sum and tl.sigmoid, are created then) and before the kernel module is imported. It is set here when this
conftest comes first; but peft imports triton, and ``tests/conftest.py`` imports peft, so in practice it has to
be set in the environment:

    TRITON_INTERPRET=1 python -m pytest tests/kernels_interpret   # interpreter, CPU tensors
    TRITON_INTERPRET=0 python -m pytest tests/kernels_interpret   # compiled kernels, CUDA tensors
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

if "TRITON_INTERPRET" not in os.environ:
    if "triton" in sys.modules:
        raise pytest.UsageError(
            "tests/kernels_interpret: triton was imported before TRITON_INTERPRET could be set; run "
            "`TRITON_INTERPRET=1 python -m pytest tests/kernels_interpret` (interpreter, CPU) or "
            "`TRITON_INTERPRET=0 python -m pytest tests/kernels_interpret` (compiled, CUDA)")
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).parent))
