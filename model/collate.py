"""Padded, masked batches over videos: :class:`FusionBatch` and :func:`collate`.

Every sequence is right-padded with zeros to the longest one in the batch (at least one step, so no
tensor has a zero-size time axis) and its true length is kept; the model never reads padding (packed
LSTMs, masked attention, masked max-pool), so neither the amount nor the values of padding change
any output. ``has_title`` is False for a video whose title is empty *and* that has no text-encoder
tokens; such a video's text branch is replaced by the attention's learned query (see fusion.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from model.chars import CharVocab
from model.features import VideoFeatures
from model.labels import LabelSet


@dataclass
class FusionBatch:
    image: torch.Tensor  # (B, T_i, D_i) float32
    image_len: torch.Tensor  # (B,) int64
    image_times: torch.Tensor  # (B, T_i) float64, seconds; padding 0
    audio: torch.Tensor  # (B, T_a, D_a) float32
    audio_len: torch.Tensor  # (B,) int64
    text: torch.Tensor  # (B, L, D_t) float32 text-encoder token states
    text_mask: torch.Tensor  # (B, L) bool
    char_ids: torch.Tensor  # (B, L_c) int64, 0 = padding
    char_mask: torch.Tensor  # (B, L_c) bool
    has_title: torch.Tensor  # (B,) bool
    labels: torch.Tensor | None = None  # (B, C) float32 multi-hot
    video_ids: tuple[str, ...] = ()
    durations: tuple[float, ...] = ()

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def to(self, device: torch.device | str) -> FusionBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


def _pad(seqs: list[np.ndarray], dim: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    out = np.zeros((len(seqs), max(1, int(lengths.max(initial=0))), dim), dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s):
            if s.ndim != 2 or s.shape[1] != dim:
                raise ValueError(f"sequence of shape {s.shape} in a batch of dim {dim}")
            out[i, : len(s)] = s
    return out, lengths


def _rows(a: np.ndarray) -> np.ndarray:
    """A (T, D) view of a feature array; an empty one becomes (0, D) or (0, 0)."""
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 2:
        return a
    if a.size == 0:
        return np.zeros((0, a.shape[-1] if a.ndim > 1 else 0), dtype=np.float32)
    return a.reshape(len(a), -1)


def _dim(seqs: list[np.ndarray], default: int) -> int:
    for s in seqs:
        if s.ndim == 2 and s.shape[1] > 0:
            return int(s.shape[1])
    return default


def collate(
    videos: list[VideoFeatures],
    *,
    labels: LabelSet | None,
    chars: CharVocab | None,
    device: torch.device | str = "cpu",
    dims: dict[str, int] | None = None,
) -> FusionBatch:
    """Pad and stack ``videos`` into one batch.

    ``dims`` ({"image", "audio", "text"} -> feature width) fixes the widths when every video in the
    batch has an empty sequence of some kind (otherwise they are read from the data). ``labels`` adds
    the multi-hot targets (labels outside the set are ignored); ``chars`` adds character ids.
    """
    if not videos:
        raise ValueError("empty batch")
    dims = dims or {}
    images = [_rows(v.image) for v in videos]
    audios = [_rows(v.audio) for v in videos]
    texts = [_rows(v.text) for v in videos]
    image, image_len = _pad(images, _dim(images, dims.get("image", 1)), np.float32)
    times = np.zeros(image.shape[:2], dtype=np.float64)
    for i, v in enumerate(videos):
        times[i, : len(v.image_times)] = v.image_times
    audio, audio_len = _pad(audios, _dim(audios, dims.get("audio", 128)), np.float32)
    text, text_len = _pad(texts, _dim(texts, dims.get("text", 1)), np.float32)
    text_mask = np.arange(text.shape[1])[None, :] < text_len[:, None]

    if chars is not None:
        ids = [chars.encode(v.title) for v in videos]
    else:
        ids = [[] for _ in videos]
    char_len = np.array([len(x) for x in ids], dtype=np.int64)
    char_ids = np.zeros((len(videos), max(1, int(char_len.max(initial=0)))), dtype=np.int64)
    for i, x in enumerate(ids):
        char_ids[i, : len(x)] = x
    char_mask = np.arange(char_ids.shape[1])[None, :] < char_len[:, None]
    has_title = np.array([bool(v.title.strip()) or len(t) > 0 for v, t in zip(videos, texts, strict=True)])

    target = None
    if labels is not None:
        target = torch.from_numpy(np.stack([labels.encode(v.labels) for v in videos])).to(device)
    return FusionBatch(
        image=torch.from_numpy(image).to(device),
        image_len=torch.from_numpy(image_len).to(device),
        image_times=torch.from_numpy(times).to(device),
        audio=torch.from_numpy(audio).to(device),
        audio_len=torch.from_numpy(audio_len).to(device),
        text=torch.from_numpy(text).to(device),
        text_mask=torch.from_numpy(text_mask).to(device),
        char_ids=torch.from_numpy(char_ids).to(device),
        char_mask=torch.from_numpy(char_mask).to(device),
        has_title=torch.from_numpy(has_title).to(device),
        labels=target,
        video_ids=tuple(v.video_id for v in videos),
        durations=tuple(float(v.duration_s) for v in videos),
    )
