"""VGGish log-mel front end in NumPy: the spec's constants, its helpers, and patches cut in one go or from a stream.

Spec (the behaviour of Google's reference, ``vggish_input`` / ``mel_features``): 16 kHz mono float waveform
in [-1, 1]; 25 ms frames (400 samples) every 10 ms (160 samples), no centre padding, so
``frames = 1 + floor((n - 400) / 160)``; periodic Hann window; 512-point real FFT of each zero-padded frame;
magnitude (not power); 64 triangular mel bands on the HTK scale ``mel = 1127 ln(1 + f / 700)`` between 125
and 7500 Hz, built like the reference's ``spectrogram_to_mel_matrix`` (including its zeroed DC row);
``log(mel + 0.01)``. The log-mel frames are cut into non-overlapping patches of 96 frames (0.96 s); a
remainder shorter than 96 frames is dropped, as the reference's ``frame()`` does.

Patch ``j`` covers samples ``[15360 j, 15360 j + 15600)``; :class:`PatchCutter` uses that to cut patches
from audio that arrives in chunks, with results identical to cutting the whole waveform at once.

This module imports NumPy only, never torch: the decoder processes (:mod:`worker.media.source`) cut patches
with it. :mod:`model.audio_frontend` is the same front end in torch (batched, on CPU or GPU) and takes its
constants and tables from here. The NumPy computation is float32 throughout, step for step as
``LogMelFrontend.forward`` (``np.fft.rfft`` of float32 frames is complex64); the two agree to about 1e-5
in log-mel units.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = [
    "FFT_LENGTH", "HOP_SAMPLES", "LOG_OFFSET", "MEL_BANDS", "MEL_MAX_HZ", "MEL_MIN_HZ", "PATCH_FRAMES",
    "PATCH_HOP_SAMPLES", "PATCH_SECONDS", "PATCH_SPAN_SAMPLES", "SAMPLE_RATE", "WINDOW_SAMPLES", "PatchCutter",
    "hertz_to_mel", "log_mel", "log_mel_patches", "mel_matrix", "num_frames", "num_patches", "periodic_hann",
]  # fmt: skip

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 400  # 25 ms
HOP_SAMPLES = 160  # 10 ms
FFT_LENGTH = 512  # 2 ** ceil(log2(400))
MEL_BANDS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
PATCH_FRAMES = 96
PATCH_SECONDS = PATCH_FRAMES * HOP_SAMPLES / SAMPLE_RATE  # 0.96
PATCH_HOP_SAMPLES = PATCH_FRAMES * HOP_SAMPLES  # 15360: start of patch j+1 minus start of patch j
PATCH_SPAN_SAMPLES = (PATCH_FRAMES - 1) * HOP_SAMPLES + WINDOW_SAMPLES  # 15600 samples feed one patch


def hertz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale as in the reference: ``1127 ln(1 + f / 700)``."""
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_matrix(
    num_mel_bins: int = MEL_BANDS,
    num_spectrogram_bins: int = FFT_LENGTH // 2 + 1,
    sample_rate: int = SAMPLE_RATE,
    lower_hz: float = MEL_MIN_HZ,
    upper_hz: float = MEL_MAX_HZ,
) -> np.ndarray:
    """(num_spectrogram_bins, num_mel_bins) float64 weights, built like ``spectrogram_to_mel_matrix``.

    Triangles are defined in mel space on ``num_mel_bins + 2`` evenly spaced edges; the DC bin's row is
    zeroed, as in the reference.
    """
    nyquist = sample_rate / 2.0
    if not 0.0 <= lower_hz < upper_hz <= nyquist:
        raise ValueError(f"mel range must satisfy 0 <= {lower_hz} < {upper_hz} <= {nyquist}")
    bins_mel = hertz_to_mel(np.linspace(0.0, nyquist, num_spectrogram_bins))
    edges = np.linspace(hertz_to_mel(lower_hz), hertz_to_mel(upper_hz), num_mel_bins + 2)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    lower_slope = (bins_mel[:, None] - lower) / (centre - lower)
    upper_slope = (upper - bins_mel[:, None]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(lower_slope, upper_slope))
    weights[0, :] = 0.0
    return weights


def periodic_hann(length: int = WINDOW_SAMPLES) -> np.ndarray:
    """(length,) float64 periodic Hann window, ``0.5 - 0.5 cos(2 pi n / length)``, as the reference's."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(length, dtype=np.float64) / length)


def num_frames(num_samples: int) -> int:
    """Log-mel frames of a waveform of ``num_samples`` samples (0 when shorter than one window)."""
    if num_samples < WINDOW_SAMPLES:
        return 0
    return 1 + (num_samples - WINDOW_SAMPLES) // HOP_SAMPLES


def num_patches(num_samples: int) -> int:
    """Whole 96-frame patches in a waveform of ``num_samples`` samples."""
    return num_frames(num_samples) // PATCH_FRAMES


@cache
def _tables() -> tuple[np.ndarray, np.ndarray]:
    """The float32 window and mel matrix (built once per process; read-only)."""
    window, mel = periodic_hann().astype(np.float32), mel_matrix().astype(np.float32)
    window.flags.writeable = mel.flags.writeable = False
    return window, mel


def log_mel(waveform: np.ndarray) -> np.ndarray:
    """``(n,)`` float waveform -> ``(frames, 64)`` float32 log-mel spectrogram (``frames`` as :func:`num_frames`).

    Frames are strided views of the waveform (no copy before windowing); one batched ``rfft`` of all of
    them, so the cost is linear in ``n``."""
    x = np.asarray(waveform, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected (n,) waveform, got shape {x.shape}")
    if x.size < WINDOW_SAMPLES:
        return np.zeros((0, MEL_BANDS), np.float32)
    window, mel = _tables()
    frames = sliding_window_view(x, WINDOW_SAMPLES)[::HOP_SAMPLES]  # (F, 400), a view
    magnitude = np.abs(np.fft.rfft(frames * window, n=FFT_LENGTH))  # (F, 257) float32
    return np.log(magnitude @ mel + np.float32(LOG_OFFSET))


def log_mel_patches(samples: np.ndarray, block_patches: int = 64) -> np.ndarray:
    """16 kHz mono float samples -> ``(P, 96, 64)`` float32 log-mel patches (NumPy ``waveform_to_patches``).

    Non-overlapping; trailing frames that do not fill a patch are dropped, so audio shorter than 0.975 s
    gives ``P = 0``. Multi-channel input ``(n, C)`` is averaged to mono. Long audio is processed
    ``block_patches`` patches (about 61 s) at a time, so the intermediate spectra stay small; the result
    does not depend on the block size."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected (n,) or (n, channels) samples, got shape {x.shape}")
    patches = num_patches(x.shape[0])
    out = np.empty((patches, PATCH_FRAMES, MEL_BANDS), np.float32)
    for first in range(0, patches, block_patches):
        count = min(block_patches, patches - first)
        start = first * PATCH_HOP_SAMPLES
        segment = x[start : start + (count - 1) * PATCH_HOP_SAMPLES + PATCH_SPAN_SAMPLES]
        block = log_mel(segment)[: count * PATCH_FRAMES]
        out[first : first + count] = block.reshape(count, PATCH_FRAMES, MEL_BANDS)
    return out


class PatchCutter:
    """Cuts log-mel patches out of audio that arrives in chunks, keeping at most one patch span of samples.

    ``push(chunk)`` returns the ``(n, 96, 64)`` float32 patches completed by the chunk (``n`` may be 0).
    The concatenation of all returned patches equals :func:`log_mel_patches` of the whole waveform:
    patch ``j`` only depends on samples ``[15360 j, 15360 j + 15600)``. Each push costs time proportional
    to the chunk (plus the fewer than 15600 samples carried over). ``patches_emitted`` counts the patches
    returned so far, so the next patch starts ``patches_emitted * 0.96`` s into the audio.
    """

    def __init__(self) -> None:
        self._buffer = np.zeros(0, dtype=np.float32)
        self.patches_emitted = 0

    def push(self, chunk: np.ndarray) -> np.ndarray:
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        self._buffer = np.concatenate([self._buffer, chunk])  # a copy: the caller may reuse its array
        patches = num_patches(len(self._buffer))
        if patches == 0:
            return np.zeros((0, PATCH_FRAMES, MEL_BANDS), np.float32)
        out = log_mel_patches(self._buffer)
        self._buffer = self._buffer[patches * PATCH_HOP_SAMPLES :].copy()
        self.patches_emitted += patches
        return out
