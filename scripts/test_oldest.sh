#!/usr/bin/env bash
# The adapter, loader and editing tests against the OLDEST dependencies pyproject.toml allows (peft 0.18.0 with
# transformers 4.56.2), in their own venv (.venv-oldest, set up by scripts/setup.sh); scripts/test.sh covers the
# newest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
PERSEDIT_VENV=.venv-oldest PERSEDIT_PINS="peft==0.18.0 transformers==4.56.2" source scripts/setup.sh
python -m pip list 2>/dev/null | grep -E "^(peft|transformers|torch) "
python -m pytest -q --timeout=900 -p no:cacheprovider tests/test_adapter.py \
    tests/test_adapter_batching.py tests/test_adapter_errors.py tests/test_adapter_registration.py \
    tests/test_adapter_saveload.py tests/test_adapter_training.py tests/test_adapter_real_model.py \
    tests/test_default_model.py tests/test_editing.py
