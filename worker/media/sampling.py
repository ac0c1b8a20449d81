"""Sampling policy, target timestamps and the per-video decode plan (a cost model on the packet layout).

Targets: the video is cut into ``n = ceil(duration * fps)`` bins of ``1/fps`` seconds (the last one
clipped at the end); when ``n > max_frames`` it is cut into ``max_frames`` equal bins over the whole
duration instead. The target of a bin is its centre. The contract is ``|sampled - target| <= interval / 2``
(``interval`` = the bin width), i.e. each sample lies in its own bin.

The plan is made from the video's :class:`Layout`: every packet in decode order with its presentation
time and keyframe flag (from a packet-only demux pass, or the container index for URLs). Strategies
(names appear in ``DecodeStats.strategy`` and ``tagstream probe``):

- ``"keyframes"``: every target has its own keyframe within ``interval / 2``; only those keyframe
  packets are sent to the decoder (every other packet is demuxed and dropped, or seeked over).
- ``"seek"``: per target, the frame within ``interval / 2`` that needs the fewest packets not already
  decoded (ties: the one nearest to the target), so a bin without a keyframe of its own usually gets the
  first frame of the bin instead of the one at its centre (the contract allows any frame in the bin; on
  2 s keyframe intervals at 1 sample/s that halves the decoding, see BENCHMARKS.md); only the packets
  those frames need (from their keyframe on, in decode order) are decoded.
  Between the decoded runs the demuxer seeks when the gap is longer than :data:`SEEK_GAP_PACKETS`
  packets, and otherwise reads and drops the packets (cheaper than a seek, which also drains and flushes
  the decoder). Leading pictures (after a keyframe in decode order, before it in display order) are
  dropped after a gap: they may reference the skipped packets.
- ``"seek_nonref"``: the seek plan with ``skip_frame=NONREF`` where the NONREF rule below holds: only
  *anchor* frames (keyframes and frames shown after every packet decoded before them, i.e. I and P
  frames, never a B-frame) are chosen, and the B-frames on the way are sent but not decoded. On IBBP
  content a frame one second into a GOP then costs its P-frames only, about a third of the packets.
- ``"sequential"``: every packet up to the last target's nearest frame; the sample is the nearest frame.
- ``"sequential_nonref"``: like sequential with ``skip_frame=NONREF`` (frames nothing references are not
  decoded). Chosen only for codecs whose FFmpeg decoder honours it and only when half a sample interval
  spans at least :data:`NONREF_MIN_FRAMES` frame durations: encoders put at most 16 consecutive
  non-reference frames between references (x264/x265 ``bframes`` <= 16), so the nearest reference frame
  is then at most 8.5 frames from any target. The decoder checks every sample anyway and, if a stream
  breaks that assumption, re-decodes from the keyframe before the missed target without skipping.

Costs are estimated decoded frames (a seek counts :data:`SEEK_COST_FRAMES`, a dropped packet
:data:`SKIP_COST_FRAMES`, a NONREF-decoded frame :data:`NONREF_FRAME_SHARE`); the cheapest wins, ties
going to the simpler strategy. Without a layout the plan is ``sequential`` / ``sequential_nonref``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

SEEK_COST_FRAMES = 2.0
SKIP_COST_FRAMES = 0.02
SEEK_GAP_PACKETS = 100  # seek instead of reading through gaps longer than this (SEEK / SKIP cost)
NONREF_MIN_FRAMES = 8.5  # (16 non-reference frames in a row + 1) / 2
NONREF_FRAME_SHARE = 0.75  # typical share of frames that are references (B-frame content)
#: decoders that honour skip_frame=NONREF (FFmpeg's vp9 decoder ignores it; libdav1d maps it to dav1d's
#: reference-only decoding)
NONREF_CODECS = frozenset({"h264", "hevc", "mpeg2video", "mpeg1video", "vc1", "wmv3", "av1", "libdav1d"})


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
class Layout:
    """Video packets in decode order: presentation time (seconds from the stream start) and keyframe flag.

    ``exact`` is True when the times are the packets' own presentation times (a demux pass); False when
    they come from a container index (decode times shifted to start at 0, which equal the presentation
    times for constant frame rate, closed-GOP video and are close otherwise).
    """

    times: np.ndarray
    keys: np.ndarray
    exact: bool = True

    @classmethod
    def from_times(cls, frame_times: np.ndarray, key_times: np.ndarray, exact: bool = True) -> Layout:
        """A layout without reordering (decode order = display order); keyframes matched by time."""
        t = np.sort(np.asarray(frame_times, np.float64))
        keys = np.isin(np.round(t, 6), np.round(np.asarray(key_times, np.float64), 6))
        return cls(t, keys, exact)

    @property
    def key_times(self) -> np.ndarray:
        return self.times[self.keys]

    def __len__(self) -> int:
        return len(self.times)


@dataclass(frozen=True)
class Plan:
    """What to decode. ``send`` (bool per packet, decode order) is None for "everything up to ``last``"
    (or to the end when ``last`` < 0); ``aims`` are the presentation times to pick per target (the
    planned frames; the targets themselves for sequential plans); ``seek_to`` are the packet indices
    (keyframes) reached by seeking; ``skip_frame`` is the decoder's discard level."""

    strategy: str
    costs: dict[str, float]
    aims: np.ndarray
    send: np.ndarray | None = None
    last: int = -1
    seek_to: tuple[int, ...] = ()
    skip_frame: str = "DEFAULT"
    detail: dict[str, float] = field(default_factory=dict)


def nearest_indices(frame_times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Index of the frame nearest to each target (ties go to the earlier frame); frame_times sorted."""
    idx = np.searchsorted(frame_times, targets)
    idx = np.clip(idx, 1, len(frame_times) - 1) if len(frame_times) > 1 else np.zeros_like(idx)
    if len(frame_times) > 1:
        before = frame_times[idx - 1]
        after = frame_times[idx]
        idx = np.where(np.abs(targets - before) <= np.abs(after - targets), idx - 1, idx)
    return idx


class Selector:
    """Serves targets ``first..`` in order from frames in presentation order: each gets the frame nearest
    to its aim (the planned frame's time, or the target itself), decided when a frame at or after the
    aim arrives, at once when one is within ``eps`` of it; at the end the last frame serves the rest (and
    ``exhausted`` is set: the stream had no frame for them)."""

    def __init__(self, aims: np.ndarray, eps: float, first: int = 0, fallback: bool = False) -> None:
        self.aims, self.eps, self.j, self.fallback = aims, eps, first, fallback
        self.prev: tuple[float, object] | None = None
        self.exhausted = False

    @property
    def done(self) -> bool:
        return self.j >= len(self.aims)

    def feed(self, t: float, frame: object) -> Iterator[tuple[int, float, object]]:
        aims = self.aims
        while self.j < len(aims) and t >= aims[self.j] - self.eps:
            a = aims[self.j]
            if self.prev is not None and abs(t - a) > self.eps and abs(a - self.prev[0]) <= abs(t - a):
                yield self.j, self.prev[0], self.prev[1]
            else:
                yield self.j, t, frame
            self.j += 1
        self.prev = (t, frame)

    def finish(self) -> Iterator[tuple[int, float, object]]:
        self.exhausted = True
        while self.prev is not None and self.j < len(self.aims):
            yield self.j, self.prev[0], self.prev[1]
            self.j += 1


def nonref_allowed(codec: str, stream_fps: float, tolerance_s: float) -> bool:
    """Whether ``skip_frame=NONREF`` keeps a reference frame within ``tolerance_s`` of every target."""
    return bool(codec in NONREF_CODECS and stream_fps > 0 and tolerance_s * stream_fps >= NONREF_MIN_FRAMES)


def _gaps(send: np.ndarray) -> tuple[list[int], float]:
    """Span starts reached by seeking, and the cost of the dropped packets read through."""
    idx = np.flatnonzero(send)
    if len(idx) == 0:
        return [], 0.0
    seeks, skipped = [], 0
    prev = -1
    for i in idx:
        gap = int(i - prev - 1)
        if gap > SEEK_GAP_PACKETS:
            seeks.append(int(i))
        else:
            skipped += gap
        prev = int(i)
    return seeks, skipped * SKIP_COST_FRAMES


class _Gops:
    """Decode-order helpers on a layout: each packet's keyframe, leading pictures, display order."""

    def __init__(self, layout: Layout) -> None:
        t, k = layout.times, layout.keys.copy()
        k[0] = True  # a stream that starts without a keyframe is decoded from its first packet
        self.times, self.n = t, len(t)
        self.key_idx = np.flatnonzero(k)
        self.is_key = k
        self.gop = np.cumsum(k) - 1
        self.start = self.key_idx[self.gop]
        self.leading = t < t[self.start]
        self.order = np.argsort(t, kind="stable")  # display position -> packet index
        self.display_t = t[self.order]
        # anchors: shown after everything decoded before them (I and P frames; B-frames are shown earlier)
        self.anchor = k | (t > np.concatenate([[-np.inf], np.maximum.accumulate(t)[:-1]]))

    def needed(self, i: int) -> np.ndarray:
        """Packets to decode for packet ``i`` when nothing else is decoded: its GOP from the keyframe,
        without leading pictures (unless ``i`` is one: then the previous GOP too)."""
        s = int(self.start[i])
        if self.leading[i]:
            s = int(self.start[s - 1]) if s > 0 else 0
            return np.arange(s, i + 1)
        r = np.arange(s, i + 1)
        return r[~self.leading[r] | (r == i)]


def _cheapest_in_window(g: _Gops, order: np.ndarray, display_t: np.ndarray, target: float, tol: float,
                        last_t: float) -> list[int]:
    """Candidate packets for ``target`` among the frames ``order`` (packet indices in display order,
    times ``display_t``): in each GOP, the frame shown within ``tol`` of it (and after ``last_t``) that
    comes first in decode order. Within a GOP the packets a frame needs grow with its decode position, so
    no other frame of that GOP in the window is cheaper."""
    lo = max(int(np.searchsorted(display_t, target - tol - 1e-9)), int(np.searchsorted(display_t, last_t, "right")))
    hi = int(np.searchsorted(display_t, target + tol + 1e-9, side="right"))
    if lo >= hi:
        return []
    idx = order[lo:hi]
    idx = idx[~g.leading[idx]]
    if len(idx) == 0:
        return []
    gops = g.gop[idx]
    first: dict[int, int] = {}
    for i, gop in zip(idx.tolist(), gops.tolist(), strict=True):
        if gop not in first or i < first[gop]:
            first[gop] = i
    return list(first.values())


def _plan_seek(g: _Gops, targets: np.ndarray, tol: float,
               nonref: bool = False) -> tuple[np.ndarray, np.ndarray, bool, float]:
    """Greedy per target: of the nearest frame, the keyframe nearest to the target and the cheapest frame
    of each GOP within ``tol`` (:func:`_cheapest_in_window`), the one that decodes the fewest new packets
    (ties: nearest to the target); chosen frames increase in time (strictly where the frame rate allows).
    With ``nonref`` only anchors are chosen and a non-anchor packet costs :data:`SKIP_COST_FRAMES` (sent,
    not decoded). Returns (send mask, aims, keyframes only, cost in decoded frames)."""
    send = np.zeros(g.n, bool)
    aims = np.empty(len(targets))
    weight = np.where(g.anchor | (not nonref), 1.0, SKIP_COST_FRAMES)
    order = g.order[g.anchor[g.order]] if nonref else g.order  # candidate packets in display order
    display_t = g.times[order]
    near = nearest_indices(display_t, targets)
    key_t = g.times[g.key_idx]
    last_t = -math.inf
    only_keys = True

    def option(i: int, rank: int, target: float) -> tuple[float, float, int, int, np.ndarray]:
        need = g.needed(i)
        return float(weight[need][~send[need]].sum()), abs(g.times[i] - target), -rank, i, need

    for j, target in enumerate(targets):
        f = int(near[j])
        while display_t[f] <= last_t and f + 1 < len(order) and abs(display_t[f + 1] - target) <= tol + 1e-9:
            f += 1  # a frame of its own when one is within the tolerance (else the previous one again)
        options = [option(int(order[f]), 1, target)]
        kk = int(nearest_indices(key_t, np.array([target]))[0]) if len(key_t) else -1
        while kk >= 0 and kk + 1 < len(key_t) and key_t[kk] <= last_t:
            kk += 1
        if kk >= 0 and key_t[kk] > last_t and abs(key_t[kk] - target) <= tol + 1e-9:
            options.append(option(int(g.key_idx[kk]), 0, target))
        options += [option(c, 0, target) for c in _cheapest_in_window(g, order, display_t, float(target), tol, last_t)]
        *_, chosen, need = min(options, key=lambda o: o[:3])
        send[need] = True
        aims[j] = g.times[chosen]
        last_t = aims[j]
        only_keys &= bool(g.is_key[chosen])
    only_keys &= bool(np.all(g.is_key[send]))
    return send, aims, only_keys, float(weight[send].sum())


def plan_strategy(
    layout: Layout | None,
    targets: np.ndarray,
    tolerance_s: float,
    *,
    codec: str = "",
    stream_fps: float = 0.0,
    force: str | None = None,
) -> Plan:
    """Pick the cheapest plan that meets the tolerance (see the module docstring). ``force`` names a
    strategy to use whatever the costs (benchmarks and tests): "sequential", "sequential_nonref" (NONREF
    even where the rule above does not allow it) or "seek" (the per-target plan: "keyframes" if that
    is what it is, "seek_nonref" where the NONREF rule holds)."""
    if force not in (None, "sequential", "sequential_nonref", "seek", "keyframes"):
        raise ValueError(f"unknown strategy {force!r}")
    targets = np.asarray(targets, np.float64)
    nonref = force == "sequential_nonref" or (force is None and nonref_allowed(codec, stream_fps, tolerance_s))
    seq_name = "sequential_nonref" if nonref else "sequential"
    skip = "NONREF" if nonref else "DEFAULT"
    if layout is None or len(layout) == 0:
        return Plan(seq_name, {seq_name: float("nan")}, targets, skip_frame=skip)
    g = _Gops(layout)
    near = nearest_indices(g.display_t, targets)
    # sequential: every packet up to the last one shown at or before the last target's nearest frame
    seq_last = int(g.order[: int(near.max()) + 1].max())
    costs = {seq_name: round((seq_last + 1) * (NONREF_FRAME_SHARE if nonref else 1.0), 2)}
    seek_nonref = force in (None, "seek") and nonref_allowed(codec, stream_fps, tolerance_s)
    send, aims, only_keys, decoded = _plan_seek(g, targets, tolerance_s, seek_nonref)
    seeks, skip_cost = _gaps(send)
    name = "keyframes" if only_keys else ("seek_nonref" if seek_nonref else "seek")
    costs[name] = round(decoded + skip_cost + SEEK_COST_FRAMES * len(seeks), 2)
    detail = {"packets": float(g.n), "keyframes": float(len(g.key_idx)), "seeks": float(len(seeks)),
              "packets_sent": float(send.sum())}
    if (force in ("seek", "keyframes")) or (force is None and costs[name] < costs[seq_name]):
        last = int(np.flatnonzero(send).max())
        return Plan(name, costs, aims, send, last, tuple(seeks), "NONREF" if name == "seek_nonref" else "DEFAULT",
                    detail)
    detail.update(seeks=0.0, packets_sent=float(seq_last + 1))
    return Plan(seq_name, costs, targets, None, seq_last, (), skip, detail)
