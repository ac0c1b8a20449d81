"""Sampling policy, target timestamps and the per-video decode strategy (a cost model on the keyframe index).

Targets: the video is cut into ``n = ceil(duration * fps)`` bins of ``1/fps`` seconds (the last one
clipped at the end); when ``n > max_frames`` it is cut into ``max_frames`` equal bins over the whole
duration instead. The target of a bin is its centre. The sample for a target is the decoded frame
whose presentation time is nearest to it; the contract is ``|sampled - target| <= interval / 2``
(``interval`` = the bin width), i.e. each sample lies in its own bin.

Strategies (names appear in ``DecodeStats.strategy``):

- ``"keyframes"``: decode only keyframes (``skip_frame=NONKEY``), when every target has a keyframe
  within ``interval / 2``; the sample is the nearest keyframe.
- ``"seek"``: per target, seek to the keyframe before the target's nearest frame ONLY when that keyframe
  lies after the current decode position, then decode forward to the nearest frame (exact).
- ``"sequential"``: decode every frame up to the last target with frame threading (exact).
- ``"sequential_nonref"``: like sequential but with ``skip_frame=NONREF`` (B-frames that nothing
  references are not decoded). Chosen only when half a sample interval spans at least
  :data:`NONREF_MIN_FRAMES` frame durations, so the nearest reference frame is always within
  tolerance (encoders put at most 16 consecutive non-reference frames between references).

The cost of each is estimated in decoded frames from the index (all frame timestamps and keyframe
flags, from ``stream.index_entries`` or a packet-only demux pass), a seek counting as
:data:`SEEK_COST_FRAMES` frames; the cheapest feasible one wins. Without an index (a URL whose
container has none) the choice is ``sequential`` / ``sequential_nonref``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SEEK_COST_FRAMES = 4.0
NONREF_MIN_FRAMES = 17
NONREF_CODECS = frozenset({"h264", "hevc", "mpeg4", "mpeg2video", "mpeg1video", "vc1", "wmv3"})


@dataclass(frozen=True)
class SamplingPolicy:
    """``fps`` samples per second of video, at most ``max_frames`` per video (uniform when longer)."""

    fps: float = 1.0
    max_frames: int = 300

    def _bins(self, duration_s: float) -> tuple[int, float]:
        duration_s = max(float(duration_s), 0.0)
        n = max(1, math.ceil(duration_s * self.fps - 1e-9))
        if n > self.max_frames:
            return self.max_frames, duration_s / self.max_frames
        return n, 1.0 / self.fps

    def interval_s(self, duration_s: float) -> float:
        """Width of one sampling bin (the sample interval) for a video of ``duration_s``."""
        return self._bins(duration_s)[1]

    def tolerance_s(self, duration_s: float) -> float:
        """How far a sampled timestamp may be from its target: half the sample interval."""
        return self.interval_s(duration_s) / 2.0

    def target_times(self, duration_s: float) -> np.ndarray:
        """(n,) float64 bin centres; uniform over the whole duration when ``duration*fps > max_frames``."""
        n, interval = self._bins(duration_s)
        starts = np.arange(n, dtype=np.float64) * interval
        ends = np.minimum(starts + interval, max(float(duration_s), 0.0))
        ends = np.maximum(ends, starts)
        return (starts + ends) / 2.0


@dataclass(frozen=True)
class Plan:
    strategy: str
    costs: dict[str, float]
    #: for "seek": indices into the targets where a seek happens, and the keyframe time to seek to
    seeks: tuple[tuple[int, float], ...] = ()


def nearest_indices(frame_times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Index of the frame nearest to each target (ties go to the earlier frame); frame_times sorted."""
    idx = np.searchsorted(frame_times, targets)
    idx = np.clip(idx, 1, len(frame_times) - 1) if len(frame_times) > 1 else np.zeros_like(idx)
    if len(frame_times) > 1:
        before = frame_times[idx - 1]
        after = frame_times[idx]
        idx = np.where(np.abs(targets - before) <= np.abs(after - targets), idx - 1, idx)
    return idx


def plan_strategy(
    frame_times: np.ndarray | None,
    key_times: np.ndarray | None,
    targets: np.ndarray,
    tolerance_s: float,
    *,
    codec: str = "",
    stream_fps: float = 0.0,
) -> Plan:
    """Pick the cheapest strategy that meets the tolerance (see the module docstring)."""
    nonref = bool(codec in NONREF_CODECS and stream_fps > 0 and tolerance_s * stream_fps >= NONREF_MIN_FRAMES)
    seq_name = "sequential_nonref" if nonref else "sequential"
    if frame_times is None or key_times is None or len(frame_times) == 0 or len(key_times) == 0:
        return Plan(seq_name, {seq_name: float("nan")})
    frame_times = np.sort(np.asarray(frame_times, np.float64))
    key_times = np.sort(np.asarray(key_times, np.float64))
    nearest = nearest_indices(frame_times, targets)
    costs: dict[str, float] = {}
    costs[seq_name] = float(nearest.max() + 1) * (0.6 if nonref else 1.0)

    # keyframes only: every target needs a keyframe within tolerance
    k_near = key_times[nearest_indices(key_times, targets)]
    if np.all(np.abs(k_near - targets) <= tolerance_s + 1e-9):
        costs["keyframes"] = float(np.count_nonzero(key_times <= targets.max() + tolerance_s))

    # seek only when a keyframe lies between the current position and the target's frame
    key_frame_idx = np.searchsorted(frame_times, key_times - 1e-9)  # frame index of each keyframe
    pos = -1
    cost = 0.0
    seeks: list[tuple[int, float]] = []
    for j, f in enumerate(nearest):
        f = int(f)
        if f <= pos:
            continue
        k = int(np.searchsorted(key_frame_idx, f, side="right")) - 1  # last keyframe at or before f
        k_idx = int(key_frame_idx[k]) if k >= 0 else 0
        if k_idx > pos + 1:
            cost += SEEK_COST_FRAMES + (f - k_idx + 1)
            seeks.append((j, float(key_times[max(k, 0)])))
        else:
            cost += f - pos
        pos = f
    costs["seek"] = cost
    best = min(costs, key=lambda name: (costs[name], name != seq_name))
    return Plan(best, costs, tuple(seeks) if best == "seek" else ())
