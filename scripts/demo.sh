#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv (as CI does), edit five UPQA preferences (examples/alice.json) into an adapter for
# "alice" on the embedded SmolLM2-135M-Instruct, then ask the edited model a question. Prints how long each step took.
# The first run converts the embedded GGUF once (~20 s) into the user cache ($PERSEDIT_CACHE, default
# ~/.cache/peft-persedit, ~0.5 GB, shared by every venv); the model's self-written neutral text ships with the package.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"  # spinning OpenMP threads slow everything on a shared CPU
timings=()

step() {  # step NAME COMMAND...: run it, print and remember its wall time
    local name="$1" start="$EPOCHREALTIME"
    shift
    "$@"
    local seconds
    seconds="$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
    timings+=("$(printf '%-8s %7s s' "$name" "$seconds")")
    echo "[demo] $name: ${seconds} s"
}

step setup source scripts/setup.sh
begin="$EPOCHREALTIME"
step edit persedit edit --preferences examples/alice.json --out out/alice
step show persedit show out/alice
step ask persedit ask out/alice "What's my hobby?" "What's my pet?"
echo "[demo] time per step:"
printf '  %s\n' "${timings[@]}"
awk -v a="$begin" -v b="$EPOCHREALTIME" 'BEGIN { printf "  after setup: %.1f s\n", b - a }'
