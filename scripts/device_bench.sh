#!/usr/bin/env bash
# GPU benchmark run on a lent GPU machine (issue 6; BENCHMARKS.md "## GPU").
#
#   bash scripts/device_bench.sh prepare   # HERE, once: fetch the wheels the GPU image lacks into .whl/
#                                          # (ignored by git) and copy MiniLM's tokenizer + config there
#   bash scripts/device_bench.sh [ARGS]    # THERE (repo root, .whl carried): install the wheels into
#                                          # /tmp/site, print the card, run scripts/bench_gpu.py ARGS
#
# The GPU image has torch, torchvision, transformers, numpy but no PyAV; worker.media.source and model/ need
# nothing else (worker.config / pydantic-settings are not imported). The MiniLM weights (90 MB) do not
# travel: the text benchmark uses the same config with random weights and the real tokenizer.
# Device call (one machine, about 7.5 min of the run plus the machine's start):
#   run(command="bash scripts/device_bench.sh", carry=[".whl"], timeout_s=480)
# NVDEC with one shared CUDA context per process, both transports (BENCHMARKS.md "NVDEC and CUDA
# contexts"), about 8 min: the command given there (decode + e2e; e2e with --e2e-transport process-pool;
# e2e with --e2e-hwaccel cuda; the same with --e2e-procs 4), timeout_s=580.
# Everything is written to $OUT (default /tmp/tagstream-gpu-out): env.txt, bench_gpu.log,
# bench_gpu.json, bench_gpu.md. The benchmark itself is limited to BENCH_LIMIT_S (default 400 s).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

if [ "${1:-}" = prepare ]; then
    mkdir -p .git/info .whl/minilm-tokenizer
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "av==18.1.0" || exit 1
    python3 - <<'EOF' || exit 1
import shutil
from pathlib import Path

from model.text import default_model_dir

src = default_model_dir()
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(src / name, Path(".whl/minilm-tokenizer") / name)
EOF
    for w in .whl/*.whl; do
        echo "$w: $(unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -cv 'extra ==') required dists"
    done
    du -sh .whl
    exit 0
fi

OUT="${OUT:-/tmp/tagstream-gpu-out}"
mkdir -p "$OUT"
SITE="${SITE:-/tmp/site}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "wheel install failed" | tee "$OUT/bench_gpu.log"; exit 1; }
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
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
    echo "nproc: $(nproc)"
    free -g | head -2
    echo "NVDEC libraries:"
    ldconfig -p 2>/dev/null | grep -E 'libnvcuvid|libcuda\.so' || echo "  none in the ldconfig cache"
    ls /usr/local/nvidia/lib64/libnvcuvid* /usr/lib/x86_64-linux-gnu/libnvcuvid* 2>/dev/null || true
    python3 -c "import av, torch; print('av', av.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/env.txt"

text_args=()
[ -f .whl/minilm-tokenizer/tokenizer_config.json ] && text_args=(--text-dir .whl/minilm-tokenizer)
timeout -k 10 "${BENCH_LIMIT_S:-400}" python3 scripts/bench_gpu.py --out "$OUT" ${text_args[@]+"${text_args[@]}"} "$@" 2>&1 \
    | tee "$OUT/bench_gpu.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "bench_gpu.py hit the ${BENCH_LIMIT_S:-400} s limit; partial results in $OUT/bench_gpu.json"
exit "$rc"
