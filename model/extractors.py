"""The three feature extractors as one bundle.

``build_extractors`` is the small surface the worker and the scripts use: one call builds the image,
audio and text extractors on one device, and ``Extractors.ids()`` records which networks (and which
weight files, by hash) produced a set of features, for checkpoints' ``config.json`` and result documents.
The weight-file helpers the extractor modules share are in :mod:`model.weights`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from model.image import ImageExtractor, build_image_extractor
from model.text import TextEncoder, build_text_encoder
from model.vggish import AudioExtractor, build_audio_extractor
from model.weights import resolve_device

log = logging.getLogger(__name__)


@dataclass
class Extractors:
    """Image, audio and text extractors, all resident on ``device``."""

    image: ImageExtractor
    audio: AudioExtractor
    text: TextEncoder
    device: torch.device

    def ids(self) -> dict[str, dict]:
        """``{"image": {"id", "dim"}, "audio": {...}, "text": {...}}``: which networks made the features."""
        return {
            "image": {"id": self.image.extractor_id, "dim": self.image.feature_dim},
            "audio": {"id": self.audio.extractor_id, "dim": self.audio.feature_dim},
            "text": {"id": self.text.extractor_id, "dim": self.text.feature_dim},
        }


def build_extractors(
    *,
    image_arch: str = "efficientnet_lite0",
    image_weights: str | Path | None = None,
    vggish_weights: str | Path | None = None,
    vggish_pca: str | Path | None = None,
    text_encoder_dir: str | Path | None = None,
    device: str | torch.device = "auto",
) -> Extractors:
    """Build all three extractors on one device (``"auto"``: CUDA if available, else CPU).

    Defaults (no files given): ImageNet EfficientNet-Lite0, the weight-free log-mel statistics for audio,
    and the packaged all-MiniLM-L6-v2 text encoder; see each builder. Missing files raise
    FileNotFoundError; nothing falls back to random weights.
    """
    dev = resolve_device(device)
    image = build_image_extractor(image_arch, image_weights, device=dev)
    audio = build_audio_extractor(vggish_weights, vggish_pca, device=dev)
    text = build_text_encoder(text_encoder_dir, device=dev)
    bundle = Extractors(image=image, audio=audio, text=text, device=dev)
    log.info("extractors on %s: %s", dev, bundle.ids())
    return bundle
