#!/usr/bin/env bash
# GPU benchmarks on a lent GPU machine (BENCHMARKS.md "## GPU").
#
#   bash scripts/device_bench.sh prepare   # HERE, once: the wheels the GPU image lacks (Python 3.12, pinned by
#                                          # requirements/requirements-runtime-py3.12.txt) into .whl/ (ignored by
#                                          # git), and MiniLM's tokenizer + config into .whl/minilm-tokenizer
#   bash scripts/device_bench.sh           # THERE: install the wheels into /tmp/site, print the machine, run
#                                          # scripts/bench_feed.py (decode-only and end-to-end feed of one GPU)
#   bash scripts/device_bench.sh gpu [ARGS]  # THERE: the same, then scripts/bench_gpu.py ARGS (extractors,
#                                          # fusion, decode, its own e2e harness) instead of bench_feed.py
#
# Device call for bench_feed.py (the script ends within TOTAL_S = 450 s, wheel install and clips included;
# timeout_s leaves room for the transfers):
#   run(command="bash scripts/device_bench.sh", carry=[".whl"], timeout_s=540)
# The GPU image has torch, torchvision, transformers and numpy; `prepare` fetches what the engine needs on
# top (av, timm, pydantic-settings and pydantic with their needs, prometheus-client). The weights packages
# (EfficientNet-Lite0 18 MB, MiniLM 90 MB) do not fit the 64 MiB that travels: bench_feed.py uses random
# weights with the real MiniLM config and tokenizer, and says so in its output.
# Everything is written to $OUT (default /tmp/tagstream-gpu-out): env.txt, bench_feed.log, bench_feed.json,
# bench_feed.md (gpu: bench_gpu.log, bench_gpu.json, bench_gpu.md).
# Locally, to check that nothing is missing: PY_VERSION=3.11 WHL=/tmp/whl311 bash scripts/device_bench.sh prepare,
# then PYTHON=<a venv with only torch, torchvision, transformers, numpy> WHL=/tmp/whl311 bash scripts/device_bench.sh --reduced
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
WHL="${WHL:-.whl}"
PYTHON="${PYTHON:-python3}"
WHEELS=(av timm pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types
        typing-extensions prometheus-client)

if [ "${1:-}" = prepare ]; then
    mkdir -p "$WHL/minilm-tokenizer"
    if [ "$WHL" = .whl ]; then
        mkdir -p .git/info
        grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    fi
    pins=()
    for name in "${WHEELS[@]}"; do
        pin=$(grep -ioE "^${name}==[^ ]+" requirements/requirements-runtime-py3.12.txt) \
            || { echo "no pin for $name in requirements/requirements-runtime-py3.12.txt"; exit 1; }
        pins+=("$pin")
    done
    rm -f "$WHL"/*.whl  # one version of each: two would stop the install there
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHL" "${pins[@]}" || exit 1
    prep_python=python3
    [ -x .venv/bin/python ] && prep_python=.venv/bin/python
    "$prep_python" - "$WHL/minilm-tokenizer" <<'EOF' || exit 1
import shutil
import sys
from pathlib import Path

from model.text import default_model_dir

src = default_model_dir()
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(src / name, Path(sys.argv[1]) / name)
EOF
    for w in "$WHL"/*.whl; do
        echo "$w: requires $(unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
            | sed 's/^Requires-Dist: //' | cut -d';' -f1 | tr '\n' ',' | sed 's/,$//')"
    done
    du -sh "$WHL"
    echo "the working tree travels too: $(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1) bytes tracked"
    exit 0
fi

OUT="${OUT:-/tmp/tagstream-gpu-out}"
mkdir -p "$OUT"
SITE="${SITE:-/tmp/site}"
t0=$SECONDS
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl \
    || { echo "wheel install failed" | tee "$OUT/env.txt"; exit 1; }
echo "wheels installed in $((SECONDS - t0)) s"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# FFmpeg's NVDEC loads libcuda.so.1 and libnvcuvid.so.1 at run time: make the driver's folder visible.
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
    if [ -e "$d/libnvcuvid.so.1" ] || [ -e "$d/libcuda.so.1" ]; then
        export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
done
{
    date -u
    nvidia-smi || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu \
        --format=csv 2>&1
    echo "nproc: $(nproc), load: $(cut -d' ' -f1-3 /proc/loadavg)"
    free -g | head -2
    echo "NVDEC libraries:"
    ldconfig -p 2>/dev/null | grep -E 'libnvcuvid|libcuda\.so' || echo "  none in the ldconfig cache"
    "$PYTHON" -c "import av, torch; print('av', av.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/env.txt"

text_args=()
[ -f "$WHL/minilm-tokenizer/tokenizer_config.json" ] && text_args=(--text-dir "$WHL/minilm-tokenizer")
if [ "${1:-}" = gpu ]; then
    shift
    timeout -k 10 "${BENCH_LIMIT_S:-400}" "$PYTHON" scripts/bench_gpu.py --out "$OUT" ${text_args[@]+"${text_args[@]}"} "$@" 2>&1 \
        | tee "$OUT/bench_gpu.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "bench_gpu.py hit the ${BENCH_LIMIT_S:-400} s limit; partial results in $OUT/bench_gpu.json"
    exit "$rc"
fi
# bench_feed.py plans its rows to end within --limit-s; `timeout` kills it 20 s after that.
limit=$(( ${TOTAL_S:-450} - SECONDS - 25 ))
timeout -k 5 $((limit + 20)) "$PYTHON" scripts/bench_feed.py --out "$OUT" --limit-s "$limit" \
    ${text_args[@]+"${text_args[@]}"} "$@" 2>&1 | tee "$OUT/bench_feed.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "bench_feed.py hit its limit; partial results in $OUT/bench_feed.json and bench_feed.md"
echo "device_bench.sh took $SECONDS s"
exit "$rc"
