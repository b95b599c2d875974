#!/usr/bin/env bash
# The whole test suite (the Triton interpreter's tests aside: scripts/test.sh runs those) against the OLDEST
# dependencies pyproject.toml allows (peft 0.18.0 with transformers 4.56.2), in their own venv (.venv-oldest, set
# up by scripts/setup.sh); scripts/test.sh covers the newest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
PERSEDIT_VENV=.venv-oldest PERSEDIT_PINS="peft==0.18.0 transformers==4.56.2" source scripts/setup.sh
python -m pip list 2>/dev/null | grep -E "^(peft|transformers|torch) "
python -m pytest -q --timeout=900 -p no:cacheprovider tests  # every test but the Triton interpreter's
