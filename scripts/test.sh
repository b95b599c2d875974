#!/usr/bin/env bash
# The whole test suite: the main tests, the Triton kernels under the interpreter (in their own process), ruff.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# OpenMP's default spin-waiting makes tiny matmuls ~1000x slower whenever the cores are shared
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

python -m pytest -q --timeout=900

if [ -d tests/kernels_interpret ]; then
    status=0
    TRITON_INTERPRET=1 python -m pytest -q --timeout=900 tests/kernels_interpret || status=$?
    if [ "$status" -eq 5 ]; then
        echo "tests/kernels_interpret: no tests collected"
    elif [ "$status" -ne 0 ]; then
        exit "$status"
    fi
else
    echo "tests/kernels_interpret: not present, skipped"
fi

lint_paths=()
for path in peft_persedit kernels tests benchmarks setup.py _peft_persedit_hook.py; do
    if [ -e "$path" ]; then lint_paths+=("$path"); fi
done
ruff check "${lint_paths[@]}"
