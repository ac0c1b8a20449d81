#!/usr/bin/env bash
# Create (or reuse) .venv and install the locked dependency set, then Tagstream itself without dependencies.
#   scripts/setup_env.sh          requirements/requirements-dev-pyX.Y.txt: runtime + demo, train and test extras
#   scripts/setup_env.sh runtime  requirements/requirements-runtime-pyX.Y.txt: the worker alone (what the image has)
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run again: a venv that drifted from the lock is put
# back to the locked versions. The locks cover Python 3.11 and 3.12 on Linux x86-64 (scripts/lock.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PIP_VERSION=26.3
kind=${1:-dev}
case $kind in runtime|dev) ;; *) echo "setup_env.sh: unknown lock '$kind' (runtime or dev)" >&2; exit 2 ;; esac
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pyver=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
lock=requirements/requirements-$kind-py$pyver.txt
if [ ! -f "$lock" ]; then
  echo "setup_env.sh: no lock for Python $pyver in requirements/ (3.11 and 3.12 are locked)." \
       "Remove .venv and run again with PYTHON=python3.11 or python3.12." >&2
  exit 2
fi
if [ "$(uname -sm)" != "Linux x86_64" ]; then
  echo "setup_env.sh: the locks are for Linux x86-64; on $(uname -sm) install with 'pip install -e .[test]' instead." >&2
  exit 2
fi
.venv/bin/python -m pip install --quiet "pip==$PIP_VERSION"
.venv/bin/python -m pip install --quiet --require-hashes -r "$lock"
# setuptools warns at every editable install that same-named folders in the working directory may shadow
# the package (here they *are* the package); the warning says nothing actionable, so it is silenced.
PYTHONWARNINGS=ignore::UserWarning .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
