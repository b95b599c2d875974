#!/usr/bin/env bash
# peft's own tuner test battery (tests/test_custom_models.py of the peft sdist matching the installed peft) with
# PERSEDIT cases added by tests/peft_battery/persedit_battery.py; where PERSEDIT differs from peft's tuners by
# design the test is a strict xfail with the reason (see that file). The tests are fetched at test time, never kept
# in this repo: the sdist is downloaded from PyPI into .peft-tests/ (cached), and its test-only imports (diffusers,
# datasets) go into .peft-tests/venv, a venv layered over the active one so that it stays untouched.
# Usage: bash scripts/test_peft_battery.sh [pytest args]   (with the project's venv active)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
repo="$PWD"
cache="$repo/.peft-tests"
version="$(python -c 'import peft; print(peft.__version__)')"
src="$cache/peft-$version"

if [ ! -f "$src/tests/test_custom_models.py" ]; then
    mkdir -p "$cache"
    python -m pip download --quiet --no-deps --no-binary :all: "peft==$version" -d "$cache"
    tar -xzf "$cache/peft-$version.tar.gz" -C "$cache" "peft-$version/tests"
    # peft's repository has an empty tests/__init__.py (the tests import each other relatively); the sdist omits it
    touch "$src/tests/__init__.py"
fi
# pytest settings of its own there (else pytest would take this repository's pyproject.toml for them)
printf '[pytest]\nmarkers =\n    regression: peft regression tests\n' > "$src/pytest.ini"

venv="$cache/venv"
base_site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/base" 2>/dev/null)" != "$base_site" ]; then
    python -m venv --clear "$venv"
    overlay_site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # the active venv's packages (and its .pth files: the editable peft_persedit) after the overlay's own
    echo "import site; site.addsitedir('$base_site')" > "$overlay_site/_base_venv.pth"
    echo "$base_site" > "$venv/base"
fi
"$venv/bin/python" -c 'import diffusers, datasets' 2>/dev/null \
    || "$venv/bin/python" -m pip install --quiet diffusers datasets

cd "$src"
status=0
PYTHONPATH="$repo/tests/peft_battery" HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q -p persedit_battery \
    -p no:cacheprovider --timeout=900 tests/test_custom_models.py "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "peft battery: no tests collected"
    exit 1
fi
exit "$status"
