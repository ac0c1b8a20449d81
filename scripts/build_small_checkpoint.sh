#!/usr/bin/env bash
# Rebuild the small checkpoint shipped in model/assets/tagstream-small (demo and tests use it).
# Generates the 2,000-video benchmark set, extracts features through the real decoder and default
# extractors (EfficientNet-Lite0, log-mel statistics, MiniLM), trains a reduced-size three-modality model
# with title dropout 0.4, and copies the checkpoint without its resumable training state.
# Takes about 6 minutes on 2 idle CPU cores (3 min to generate, 2 min to extract, 30 s to train). Usage: scripts/build_small_checkpoint.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-${TMPDIR:-/tmp}/tagstream-small-build}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/tagstream dataset synth "$work/synth2000" --videos 2000 --seed 1
.venv/bin/tagstream extract "$work/synth2000" "$work/feat2000" --device cpu
.venv/bin/tagstream train "$work/feat2000" "$work/small" --modalities image,audio,text --title-dropout 0.4 \
  --image-hidden 64 --audio-hidden 32 --text-filters 64 --seed 1 --threads 1
rm -rf model/assets/tagstream-small && mkdir -p model/assets/tagstream-small
cp "$work"/small/{chars.json,config.json,labels.txt,model.safetensors,history.json,learning_curves.png} \
  model/assets/tagstream-small/
.venv/bin/tagstream evaluate model/assets/tagstream-small "$work/feat2000" --split test
