"""Audio decoding: one audio stream to contiguous 16 kHz mono float32 chunks.

Interpretations:

- Every channel layout is downmixed to mono and every rate resampled to 16 kHz by FFmpeg's resampler
  (``av.AudioResampler``, swresample defaults), as VGGish expects.
- The resampler emits frames of ``chunk_n`` samples itself (``frame_size``), so Python sees about one
  frame per chunk instead of one per codec frame (AAC: 43 a second); the output samples are identical.
- Chunks are ``chunk_s`` long and contiguous from 0 (the last one shorter). Their start times count
  decoded samples, not packet timestamps: gaps in the stream's timestamps are not reproduced.
- A damaged packet is skipped (logged at debug level). A change of sample format, rate or layout
  mid-stream (joined MPEG-TS segments do this) flushes the resampler and starts a new one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import av
import av.error
import numpy as np

from worker.media.open import map_av_error
from worker.media.records import AudioChunk

__all__ = ["AUDIO_RATE", "audio_chunks"]

log = logging.getLogger(__name__)
AUDIO_RATE = 16000


def audio_chunks(container: av.container.InputContainer, stream: av.AudioStream, chunk_s: float, *,
                 uri: str, check_budget: Callable[[], None]) -> Iterator[AudioChunk]:
    """Decode ``stream`` of ``container`` to the end as :class:`AudioChunk` objects. ``check_budget`` is
    called before each packet (it raises to stop). FFmpeg errors are mapped to typed errors."""
    chunk_n = max(1, int(round(chunk_s * AUDIO_RATE)))

    def new_resampler() -> av.AudioResampler:
        return av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE, frame_size=chunk_n)

    resampler = new_resampler()

    def frames_of(decoded: Iterable[av.AudioFrame | None]) -> Iterator[np.ndarray]:
        nonlocal resampler
        for frame in decoded:
            try:
                outs = resampler.resample(frame)
            except ValueError:  # sample format, rate or layout changed mid-stream: flush, start anew
                outs = resampler.resample(None)
                resampler = new_resampler()
                outs += resampler.resample(frame)
            for out in outs:
                yield out.to_ndarray().reshape(-1)

    def samples() -> Iterator[np.ndarray]:
        for packet in container.demux(stream):
            check_budget()
            try:
                yield from frames_of(packet.decode())
            except av.error.InvalidDataError as exc:  # a damaged audio packet: skip it
                log.debug("%s: audio packet skipped: %s", uri, exc)
        yield from frames_of([None])

    buf: list[np.ndarray] = []
    buffered = emitted = 0
    try:
        for piece in samples():
            buf.append(piece)
            buffered += piece.size
            while buffered >= chunk_n:
                data = np.concatenate(buf)
                yield AudioChunk(emitted / AUDIO_RATE, data[:chunk_n].astype(np.float32, copy=False))
                emitted += chunk_n
                rest = data[chunk_n:]
                buf, buffered = [rest], rest.size
    except av.error.FFmpegError as exc:
        raise map_av_error(exc, uri) from exc
    if buffered:
        yield AudioChunk(emitted / AUDIO_RATE, np.concatenate(buf).astype(np.float32, copy=False))
