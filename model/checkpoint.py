"""Fusion checkpoints: a directory with ``model.safetensors``, ``config.json``, ``labels.txt`` and,
when the model has a character branch, ``chars.json``.

``config.json`` holds ``fusion`` (the :class:`FusionConfig`: dims, modalities, text branch),
``extractors`` (``{"image": {"id": ..., "dim": ...}, "audio": {...}, "text": {...}}``), ``sampling``
(``{"fps": ..., "max_frames": ...}``), ``labels_hash``, ``chars_hash`` and ``version``.

The model version is derived from the weights: the first 12 hex digits of the sha256 of the
``model.safetensors`` bytes (tensors are written in sorted name order, so equal weights give equal
bytes and the same version).

Extractor check: a model only makes sense on features from the extractors it was trained on. When
``expected_extractors`` is given, every modality the model *reads* is compared (image if image is on,
audio if audio is on, text only if the model uses the text-encoder branch; the character branch needs
no extractor) and a difference raises :class:`CheckpointMismatchError` naming both ids. A modality
absent from ``expected_extractors`` is not checked; one present with the id ``None`` means "these
features have none" (e.g. a MultimodalVideoTag folder opened without a text encoder) and is a
mismatch too when the model reads it, so such a model is never fed zeros in place of its features.

The text id of a model trained on a MultimodalVideoTag folder with ``--text-encoder-dir`` is that
encoder's (``<dir name>.<sha12 of its weights>``, model/text.py), recorded from the folder's
``extractors`` like any other; a worker or ``tagstream predict`` configured with another encoder is
refused here.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.chars import CharVocab
from model.errors import InputError
from model.fusion import FusionConfig, FusionModel
from model.labels import LabelSet

FORMAT = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
LABELS = "labels.txt"
CHARS = "chars.json"


class CheckpointMismatchError(InputError):
    """The checkpoint was trained on features from other extractors (or of other dims)."""


@dataclass
class LoadedCheckpoint:
    model: FusionModel
    config: FusionConfig
    labels: LabelSet
    chars: CharVocab | None
    extractors: dict[str, dict]
    sampling: dict
    version: str
    path: Path | None = None
    extra: dict = field(default_factory=dict)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def weights_version(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def save_checkpoint(
    path: str | Path,
    model: FusionModel,
    *,
    labels: LabelSet,
    chars: CharVocab | None,
    extractors: dict,
    sampling: dict,
    extra: dict | None = None,
) -> str:
    """Write the checkpoint directory (other files in it are left alone); return the version."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if len(labels) != model.config.num_labels:
        raise ValueError(f"{len(labels)} labels for a model with {model.config.num_labels} outputs")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sorted(model.state_dict().items())}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": str(FORMAT)})
    os.replace(tmp, out / WEIGHTS)
    version = weights_version(out / WEIGHTS)
    _atomic_write(out / LABELS, labels.to_text().encode("utf-8"))  # keeps aliases and unused outputs
    if chars is not None:
        _atomic_write(out / CHARS, json.dumps(chars.to_dict(), ensure_ascii=False).encode("utf-8"))
    elif (out / CHARS).exists():
        (out / CHARS).unlink()
    config = {
        "format": FORMAT,
        "version": version,
        "fusion": model.config.to_dict(),
        "extractors": extractors,
        "sampling": sampling,
        "labels_hash": labels.hash(),
        "num_labels": len(labels),
        "chars_hash": chars.hash() if chars is not None else None,
        "extra": extra or {},
    }
    _atomic_write(out / CONFIG, json.dumps(config, indent=2, ensure_ascii=False).encode("utf-8"))
    return version


def check_extractors(config: FusionConfig, extractors: dict[str, dict], expected: dict[str, str | None]) -> None:
    """Raise :class:`CheckpointMismatchError` if a modality the model reads came from another extractor."""
    used = [m for m in ("image", "audio") if m in config.modalities]
    if config.use_encoder:
        used.append("text")
    for modality in used:
        if modality not in expected:
            continue
        want = expected[modality]
        have = (extractors.get(modality) or {}).get("id")
        if want is None:
            raise CheckpointMismatchError(
                f"{modality} extractor mismatch: checkpoint was trained on {have!r}, "
                f"the features have no {modality} features (no {modality} extractor configured)"
            )
        if have != want:
            raise CheckpointMismatchError(
                f"{modality} extractor mismatch: checkpoint was trained on {have!r}, "
                f"configured extractor is {want!r}"
            )


def load_checkpoint(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    expected_extractors: dict[str, str | None] | None = None,
) -> LoadedCheckpoint:
    """Load a checkpoint directory, verify labels / weights hashes and (optionally) extractor ids.

    The model is returned in eval mode on ``device``."""
    root = Path(path)
    if not (root / CONFIG).is_file():
        raise FileNotFoundError(f"{root} is not a checkpoint directory (no {CONFIG})")
    meta = json.loads((root / CONFIG).read_text("utf-8"))
    config = FusionConfig.from_dict(meta["fusion"])
    labels = LabelSet.from_file(root / LABELS)
    if meta.get("labels_hash") not in (None, labels.hash()):
        raise CheckpointMismatchError(f"{root / LABELS} does not match the label hash in {CONFIG}")
    chars = CharVocab.from_file(root / CHARS) if (root / CHARS).is_file() else None
    extractors = meta.get("extractors", {})
    if expected_extractors:
        check_extractors(config, extractors, expected_extractors)
    version = weights_version(root / WEIGHTS)
    model = FusionModel(config)
    model.load_state_dict(load_file(str(root / WEIGHTS)))
    model.to(device).eval()
    return LoadedCheckpoint(
        model=model,
        config=config,
        labels=labels,
        chars=chars,
        extractors=extractors,
        sampling=meta.get("sampling", {}),
        version=version,
        path=root,
        extra=meta.get("extra", {}),
    )
