#!/bin/sh
# Point TAGSTREAM_* weight settings at files found under $TAGSTREAM_WEIGHTS_DIR (baked or mounted),
# unless the operator set them explicitly; then exec tagstream so signals reach it directly.
set -eu
dir=${TAGSTREAM_WEIGHTS_DIR:-/opt/tagstream/weights}
if [ -z "${TAGSTREAM_CHECKPOINT:-}" ]; then
  if [ -f "$dir/checkpoint/model.safetensors" ]; then
    export TAGSTREAM_CHECKPOINT="$dir/checkpoint"
  elif [ -f "$dir/model.safetensors" ]; then  # the folder is a checkpoint (WEIGHTS_DIR=runs/NAME, a training run)
    export TAGSTREAM_CHECKPOINT="$dir"
  fi
fi
if [ -z "${TAGSTREAM_IMAGE_WEIGHTS:-}" ] && [ -f "$dir/resnet50.pth" ]; then
  export TAGSTREAM_IMAGE_WEIGHTS="$dir/resnet50.pth" TAGSTREAM_IMAGE_ARCH="${TAGSTREAM_IMAGE_ARCH:-resnet50}"
fi
if [ -z "${TAGSTREAM_VGGISH_WEIGHTS:-}" ] && [ -f "$dir/vggish.pth" ]; then
  export TAGSTREAM_VGGISH_WEIGHTS="$dir/vggish.pth"
fi
if [ -z "${TAGSTREAM_VGGISH_PCA:-}" ] && [ -f "$dir/vggish_pca.pth" ]; then
  export TAGSTREAM_VGGISH_PCA="$dir/vggish_pca.pth"
fi
if [ -z "${TAGSTREAM_TEXT_ENCODER_DIR:-}" ] && [ -f "$dir/text-encoder/config.json" ]; then
  export TAGSTREAM_TEXT_ENCODER_DIR="$dir/text-encoder"
fi
exec tagstream "$@"
