"""Batched inference: features of many videos -> level-1 categories, level-2 tags and their time segments.

Per-tag segments (see fusion.py): in eval mode the image part of tag c's logit is exactly
``sum_t alpha_t (w_c . h_t)``; the per-frame terms ``r_t`` say where the evidence for c is. A frame is
evidence when ``r_t > 0`` and ``r_t >= segment_threshold * max_t r_t`` (default 0.5: at least half
as strong as the strongest frame). Each maximal run of consecutive evidence frames becomes one
segment ``[t_first - d/2, t_last + d/2]`` seconds, where ``t`` are the frames' presentation times and
``d`` is the video's sample spacing (the median gap between its frame times; ``1 / fps`` of the
checkpoint's sampling policy for a one-frame video), clipped to ``[0, duration]``. A tag with no
positive frame term (its evidence is audio or title only), or a model without the image modality,
gets no segments.

Which tags and categories a prediction lists (:func:`select`): with ``top_k`` only, the ``top_k``
highest (the worker's ``top_k_tags``); with ``threshold`` only, every one scoring at or above it
(MultimodalVideoTag's inference, 0.5 there); with both, those at or above the threshold, at most
``top_k``. Highest score first, ties by output index. Level-1 categories follow the same rule on their
scores (a category's score is its best child's, model/labels.py). Unused outputs (an index of
``class.txt`` no name maps to) are never listed: they were never a training target.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from model.checkpoint import LoadedCheckpoint
from model.collate import collate
from model.features import VideoFeatures


@dataclass
class TagScore:
    label: str
    score: float
    segments: list[list[float]] = field(default_factory=list)


@dataclass
class Prediction:
    video_id: str
    categories: list[tuple[str, float]]
    tags: list[TagScore]

    def to_dict(self) -> dict:
        """The ``categories`` / ``tags`` part of the result document (README, "The Redis contract")."""
        return {
            "categories": [{"label": label, "score": round(score, 6)} for label, score in self.categories],
            "tags": [
                {"label": t.label, "score": round(t.score, 6), "segments": t.segments} for t in self.tags
            ],
        }


def select(scores: np.ndarray, *, top_k: int | None, threshold: float | None,
           exclude: frozenset[int] | set[int] = frozenset()) -> list[int]:
    """Indices into ``scores`` (1-D), highest first (ties: lower index first): every score at or
    above ``threshold`` (None: no floor), at most ``top_k`` of them (None: no cap), none of ``exclude``."""
    order = [int(i) for i in np.argsort(-np.asarray(scores), kind="stable") if int(i) not in exclude]
    if threshold is not None:
        order = [i for i in order if scores[i] >= threshold]
    return order if top_k is None else order[: max(0, int(top_k))]


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def segments_from_contributions(
    contrib: np.ndarray,
    times: np.ndarray,
    *,
    duration: float,
    spacing: float,
    threshold: float = 0.5,
) -> list[list[float]]:
    """contrib (T,) per-frame logit terms of one tag, times (T,) seconds -> [[start, end], ...]."""
    if len(contrib) == 0:
        return []
    peak = float(contrib.max())
    if peak <= 0:
        return []
    on = contrib >= threshold * peak
    half = spacing / 2.0
    out: list[list[float]] = []
    t = 0
    while t < len(on):
        if not on[t]:
            t += 1
            continue
        start = t
        while t + 1 < len(on) and on[t + 1]:
            t += 1
        lo = max(0.0, float(times[start]) - half)
        hi = float(times[t]) + half
        if duration > 0:
            hi = min(hi, duration)
        out.append([round(lo, 3), round(hi, 3)])
        t += 1
    return out


def _spacing(times: np.ndarray, fps: float) -> float:
    if len(times) >= 2:
        gaps = np.diff(times)
        gaps = gaps[gaps > 0]
        if len(gaps):
            return float(np.median(gaps))
    return 1.0 / fps if fps > 0 else 1.0


class Tagger:
    """Score and tag videos with a loaded checkpoint (padded + masked batches, inference mode).

    ``top_k`` / ``threshold`` choose the listed tags and categories (:func:`select`)."""

    def __init__(
        self,
        ckpt: LoadedCheckpoint,
        *,
        top_k: int | None = 5,
        threshold: float | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        segment_threshold: float = 0.5,
    ) -> None:
        self.ckpt = ckpt
        self.top_k = top_k
        self.threshold = threshold
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.segment_threshold = segment_threshold
        self.model = ckpt.model.to(self.device).eval()
        self.dims = {
            "image": ckpt.config.image_dim,
            "audio": ckpt.config.audio_dim,
            "text": ckpt.config.text_dim or 1,
        }
        self.fps = float(ckpt.sampling.get("fps", 1.0) or 1.0)

    def _batches(self, videos: list[VideoFeatures], no_title: bool):
        for start in range(0, len(videos), self.batch_size):
            chunk = videos[start : start + self.batch_size]
            if no_title:
                chunk = [replace(v, title="", text=np.zeros((0, self.dims["text"]), np.float32)) for v in chunk]
            yield chunk, collate(chunk, labels=None, chars=self.ckpt.chars, device=self.device, dims=self.dims)

    @torch.inference_mode()
    def scores(self, videos: list[VideoFeatures], *, no_title: bool = False) -> np.ndarray:
        """(N, C) level-2 probabilities. ``no_title`` scores as if every title were missing."""
        out = [torch.sigmoid(self.model(batch).logits).float().cpu().numpy() for _, batch in self._batches(videos, no_title)]
        return np.concatenate(out) if out else np.zeros((0, len(self.ckpt.labels)), np.float32)

    @torch.inference_mode()
    def predict(self, videos: list[VideoFeatures]) -> list[Prediction]:
        labels = self.ckpt.labels
        results: list[Prediction] = []
        has_image = "image" in self.ckpt.config.modalities
        for chunk, batch in self._batches(videos, no_title=False):
            out = self.model(batch)
            probs = torch.sigmoid(out.logits).float().cpu().numpy()
            level1 = labels.level1_scores(probs)
            contrib = self.model.image_contributions(out).float().cpu().numpy() if has_image else None
            for i, video in enumerate(chunk):
                top = select(probs[i], top_k=self.top_k, threshold=self.threshold, exclude=labels.unused)
                top1 = select(level1[i], top_k=self.top_k, threshold=self.threshold)
                n = len(video.image)
                spacing = _spacing(video.image_times, self.fps)
                duration = float(video.duration_s) or (float(video.image_times[-1]) + spacing if n else 0.0)
                tags = []
                for c in top:
                    segments = []
                    if contrib is not None and n:
                        segments = segments_from_contributions(
                            contrib[i, :n, c], video.image_times, duration=duration,
                            spacing=spacing, threshold=self.segment_threshold,
                        )
                    tags.append(TagScore(labels.labels[c], float(probs[i, c]), segments))
                categories = [(labels.level1[j], float(level1[i, j])) for j in top1]
                results.append(Prediction(video.video_id, categories, tags))
        return results
