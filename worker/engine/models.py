"""Load the models a worker keeps resident: the three extractors and the fusion Tagger.

Interpretations:

* Extractors come from the settings (``image_arch``, ``image_weights``, ``vggish_weights``,
  ``vggish_pca``, ``text_encoder_dir``, ``device``), through :func:`model.extractors.build_extractors`.
* The checkpoint is ``settings.checkpoint`` when set (it must exist), else the shipped default
  ``model/assets/tagstream-small`` when that directory exists. With neither, the worker runs
  *features-only*: ``tagger`` is None, ``model_version`` is ``"features-only"`` and result documents
  carry the extracted feature shapes instead of tags (issue 2's bar before the fusion model exists).
* The checkpoint records which extractors made its training features; loading it with other
  extractors is an error naming both (raised by :func:`model.checkpoint.load_checkpoint`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import model
from model.checkpoint import load_checkpoint
from model.extractors import Extractors, build_extractors
from model.predict import Tagger
from model.progress import quiet_model_libraries
from worker.config import Settings

log = logging.getLogger(__name__)

FEATURES_ONLY = "features-only"


def default_checkpoint_dir() -> Path:
    """``model/assets/tagstream-small`` inside the installed ``model`` package."""
    return Path(model.__file__).resolve().parent / "assets" / "tagstream-small"


@dataclass
class LoadedModels:
    """Everything resident in a worker. ``tagger`` is None only when no checkpoint exists."""

    extractors: Extractors
    tagger: Tagger | None
    model_version: str
    device: torch.device
    checkpoint_dir: Path | None = None
    sampling: dict[str, Any] | None = None  # the checkpoint's sampling policy (its config.json, as read)

    def info(self) -> dict[str, str]:
        """Labels for ``tagstream_model_info`` and for logs."""
        ids = self.extractors.ids()
        return {
            "model_version": self.model_version,
            "image_extractor": str(ids["image"]["id"]),
            "audio_extractor": str(ids["audio"]["id"]),
            "text_extractor": str(ids["text"]["id"]),
            "device": str(self.device),
        }


def resolve_checkpoint(settings: Settings) -> Path | None:
    """The checkpoint directory to load, or None (features-only). A configured one must exist."""
    if settings.checkpoint is not None:
        path = Path(settings.checkpoint).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
        return path
    default = default_checkpoint_dir()
    return default if (default / "config.json").is_file() else None


def load_extractors(settings: Settings) -> Extractors:
    """The three extractors the settings name, on the settings' device."""
    quiet_model_libraries()  # no transformers weight-loading bar in the worker's log

    return build_extractors(
        image_arch=settings.image_arch,
        image_weights=settings.image_weights,
        vggish_weights=settings.vggish_weights,
        vggish_pca=settings.vggish_pca,
        text_encoder_dir=settings.text_encoder_dir,
        device=settings.device,
    )


def load_models(settings: Settings, *, with_tagger: bool = True, extractors: Extractors | None = None) -> LoadedModels:
    """Build the extractors (or reuse ``extractors``) and, unless ``with_tagger=False`` (feature
    extraction needs none), the fusion Tagger from the resolved checkpoint."""
    extractors = extractors if extractors is not None else load_extractors(settings)
    ckpt_dir = resolve_checkpoint(settings) if with_tagger else None
    if ckpt_dir is None:
        if with_tagger:
            log.warning("no fusion checkpoint found: results carry feature shapes instead of tags")
        return LoadedModels(extractors, None, FEATURES_ONLY, extractors.device)
    expected = {name: entry["id"] for name, entry in extractors.ids().items()}
    ckpt = load_checkpoint(ckpt_dir, device=extractors.device, expected_extractors=expected)
    tagger = Tagger(ckpt, top_k=settings.top_k_tags, device=extractors.device, batch_size=settings.fusion_batch_size)
    sampling = dict(ckpt.sampling or {})
    trained_fps = sampling.get("fps")
    if trained_fps is not None and abs(float(trained_fps) - settings.fps) > 1e-9:
        log.warning("checkpoint was trained with fps=%s but the worker samples at fps=%s", trained_fps, settings.fps)
    log.info("fusion model %s from %s on %s", ckpt.version, ckpt_dir, extractors.device)
    return LoadedModels(extractors, tagger, str(ckpt.version), extractors.device, ckpt_dir, sampling)
