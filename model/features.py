"""Per-video features: what the extractors produce and the fusion model consumes.

This is the one hand-off type between extraction (decoder + extractors, in the worker or in
``tagstream extract``) and the fusion model (training, evaluation, prediction).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class VideoFeatures:
    """Features of one video. Any sequence may be empty (0 rows): a video without audio has
    ``audio.shape == (0, 128)``; a video without a title has ``title == ""`` and ``text`` of 0 rows.

    image:       (T_i, D_i) float32, one row per sampled frame (ResNet-50: D_i = 2048)
    image_times: (T_i,) float64, presentation time in seconds of each sampled frame
    audio:       (T_a, 128) float32, one row per 0.96 s audio patch; patch j covers [0.96 j, 0.96 (j+1))
    text:        (L, D_t) float32, frozen text-encoder token states of the title (L <= 50), padding removed
    title:       the raw title (the character-level text branch reads it)
    labels:      "level1-level2" labels when known (training / evaluation), else empty
    """

    video_id: str
    image: np.ndarray
    image_times: np.ndarray
    audio: np.ndarray
    text: np.ndarray
    title: str = ""
    labels: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    AUDIO_PATCH_S = 0.96

    def __post_init__(self) -> None:
        self.image = np.asarray(self.image, dtype=np.float32).reshape(len(self.image), -1)
        self.image_times = np.asarray(self.image_times, dtype=np.float64).reshape(-1)
        self.audio = np.asarray(self.audio, dtype=np.float32)
        self.text = np.asarray(self.text, dtype=np.float32)
        if len(self.image_times) != len(self.image):
            raise ValueError(f"{len(self.image)} image rows but {len(self.image_times)} timestamps")
