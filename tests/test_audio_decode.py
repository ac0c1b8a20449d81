"""worker.media.audio on real encoded audio: the chunked resampler output is the same signal as FFmpeg's
per-frame resampling, chunks are contiguous and full-sized, and the budget callback stops decoding."""

from __future__ import annotations

import av
import numpy as np
import pytest
from media import make_video

from worker.media.audio import AUDIO_RATE, audio_chunks


def per_frame_reference(path) -> np.ndarray:
    """Plain PyAV: one resample call per decoded frame, no output frame size."""
    out = []
    with av.open(str(path)) as c:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
        for frame in c.decode(c.streams.audio[0]):
            out += [o.to_ndarray().reshape(-1) for o in resampler.resample(frame)]
        out += [o.to_ndarray().reshape(-1) for o in resampler.resample(None)]
    return np.concatenate(out)


@pytest.mark.parametrize("codec,layout", [("aac", "5.1"), ("libopus", "mono"), ("mp3", "stereo")])
def test_chunks_match_per_frame_resampling(tmp_path, codec, layout):
    suffix = ".mkv" if codec == "libopus" else ".mp4"
    path = make_video(tmp_path / f"a{suffix}", seconds=3.3, fps=10, audio=codec, audio_layout=layout)
    with av.open(str(path)) as c:
        chunks = list(audio_chunks(c, c.streams.audio[0], 1.0, uri=str(path), check_budget=lambda: None))
    assert [ch.start_s for ch in chunks] == pytest.approx(list(range(len(chunks))))
    assert all(ch.samples.size == AUDIO_RATE for ch in chunks[:-1]) and 0 < chunks[-1].samples.size <= AUDIO_RATE
    assert all(ch.samples.dtype == np.float32 and ch.samples.flags.c_contiguous for ch in chunks)
    samples = np.concatenate([ch.samples for ch in chunks])
    assert np.array_equal(samples, per_frame_reference(path))
    assert abs(samples.size / AUDIO_RATE - 3.3) < 0.1


def test_budget_callback_stops_decoding(tmp_path):
    path = make_video(tmp_path / "a.mp4", seconds=3, fps=10, audio="aac")
    calls = []

    def budget() -> None:
        calls.append(1)
        if len(calls) > 5:
            raise TimeoutError("budget spent")

    with av.open(str(path)) as c, pytest.raises(TimeoutError):
        list(audio_chunks(c, c.streams.audio[0], 1.0, uri=str(path), check_budget=budget))
    assert len(calls) == 6
