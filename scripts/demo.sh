#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv (as CI does), edit five UPQA preferences (examples/alice.json) into an adapter for
# "alice" on the embedded SmolLM2-135M-Instruct, then ask the edited model a question.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
persedit edit --preferences examples/alice.json --out out/alice
persedit show out/alice
persedit ask out/alice "What's my hobby?" "What's my pet?"
