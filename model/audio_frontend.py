"""VGGish log-mel front end, in torch, exactly as Google's reference (``vggish_input`` / ``mel_features``).

Spec (the reference's behaviour): 16 kHz mono float waveform in [-1, 1]; 25 ms frames (400 samples) every
10 ms (160 samples), no centre padding, so ``frames = 1 + floor((n - 400) / 160)``; periodic Hann window;
512-point real FFT of each zero-padded frame; magnitude (not power); 64 triangular mel bands on the HTK
scale ``mel = 1127 ln(1 + f / 700)`` between 125 and 7500 Hz, built like the reference's
``spectrogram_to_mel_matrix`` (including its zeroed DC row); ``log(mel + 0.01)``. The log-mel frames are
cut into non-overlapping patches of 96 frames (0.96 s); a remainder shorter than 96 frames is dropped,
as the reference's ``frame()`` does.

Framing is done with ``Tensor.unfold`` + ``torch.fft.rfft(n=512)`` rather than ``torch.stft``: ``stft`` centres
a 400-sample window inside a 512-sample frame, which shifts every frame by 56 samples relative to the
reference. ``unfold`` reproduces the reference framing exactly and is batched, on CPU or GPU.

Patch ``j`` covers samples ``[15360 j, 15360 j + 15600)``; :class:`PatchStream` uses that to cut patches
from audio that arrives in chunks, with results identical to cutting the whole waveform at once.
"""

from __future__ import annotations

import math

import numpy as np
import torch

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


def num_frames(num_samples: int) -> int:
    """Log-mel frames of a waveform of ``num_samples`` samples (0 when shorter than one window)."""
    if num_samples < WINDOW_SAMPLES:
        return 0
    return 1 + (num_samples - WINDOW_SAMPLES) // HOP_SAMPLES


def num_patches(num_samples: int) -> int:
    """Whole 96-frame patches in a waveform of ``num_samples`` samples."""
    return num_frames(num_samples) // PATCH_FRAMES


class LogMelFrontend(torch.nn.Module):
    """Batched VGGish log-mel spectrogram: ``(B, n)`` float waveform -> ``(B, frames, 64)`` float32.

    Computation runs in float32 on the input's device (the module's buffers follow ``.to(device)``);
    against a float64 NumPy reference the difference is about 1e-4 in log-mel units.
    """

    window: torch.Tensor
    mel: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        n = torch.arange(WINDOW_SAMPLES, dtype=torch.float64)
        periodic_hann = 0.5 - 0.5 * torch.cos(2.0 * math.pi * n / WINDOW_SAMPLES)
        self.register_buffer("window", periodic_hann.float(), persistent=False)
        self.register_buffer("mel", torch.from_numpy(mel_matrix()).float(), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.dim() == 1:
            waveform = waveform.unsqueeze(0)
        if waveform.dim() != 2:
            raise ValueError(f"expected (B, n) waveform, got shape {tuple(waveform.shape)}")
        waveform = waveform.to(device=self.window.device, dtype=torch.float32)
        batch, samples = waveform.shape
        if samples < WINDOW_SAMPLES:
            return waveform.new_zeros((batch, 0, MEL_BANDS))
        frames = waveform.unfold(-1, WINDOW_SAMPLES, HOP_SAMPLES)  # (B, F, 400), a view
        magnitude = torch.fft.rfft(frames * self.window, n=FFT_LENGTH).abs()  # (B, F, 257)
        return torch.log(magnitude @ self.mel + LOG_OFFSET)


_DEFAULT_FRONTEND: LogMelFrontend | None = None


def _default_frontend() -> LogMelFrontend:
    global _DEFAULT_FRONTEND
    if _DEFAULT_FRONTEND is None:
        _DEFAULT_FRONTEND = LogMelFrontend()
    return _DEFAULT_FRONTEND


def waveform_to_patches(
    samples: np.ndarray | torch.Tensor,
    frontend: LogMelFrontend | None = None,
    block_patches: int = 64,
) -> torch.Tensor:
    """16 kHz mono float samples -> ``(P, 96, 64)`` float32 log-mel patches on the front end's device.

    Non-overlapping; trailing frames that do not fill a patch are dropped (the reference's behaviour),
    so audio shorter than 0.975 s gives ``P = 0``. Multi-channel input ``(n, C)`` is averaged to mono
    like ``vggish_input.waveform_to_examples``; resampling is the decoder's job. Long audio is processed
    ``block_patches`` patches (about 61 s) at a time, so the intermediate spectra stay small; the result
    does not depend on the block size.
    """
    frontend = frontend if frontend is not None else _default_frontend()
    x = torch.as_tensor(samples)
    if x.dim() == 2:
        x = x.float().mean(dim=1)
    if x.dim() != 1:
        raise ValueError(f"expected (n,) or (n, channels) samples, got shape {tuple(x.shape)}")
    patches = num_patches(x.shape[0])
    if patches == 0:
        return torch.zeros((0, PATCH_FRAMES, MEL_BANDS), device=frontend.window.device)
    blocks = []
    for first in range(0, patches, block_patches):
        count = min(block_patches, patches - first)
        start = first * PATCH_HOP_SAMPLES
        segment = x[start : start + (count - 1) * PATCH_HOP_SAMPLES + PATCH_SPAN_SAMPLES]
        log_mel = frontend(segment.unsqueeze(0))[0, : count * PATCH_FRAMES]
        blocks.append(log_mel.reshape(count, PATCH_FRAMES, MEL_BANDS))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


class PatchStream:
    """Cuts log-mel patches out of audio that arrives in chunks, keeping at most one patch of samples.

    ``push(chunk)`` returns the patches completed by the chunk (possibly none). The concatenation of all
    returned patches equals ``waveform_to_patches`` of the whole waveform: patch ``j`` only depends on
    samples ``[15360 j, 15360 j + 15600)``.
    """

    def __init__(self, frontend: LogMelFrontend | None = None) -> None:
        self.frontend = frontend if frontend is not None else _default_frontend()
        self._buffer = np.zeros(0, dtype=np.float32)
        self.patches_emitted = 0

    def push(self, chunk: np.ndarray) -> torch.Tensor:
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        self._buffer = np.concatenate([self._buffer, chunk]) if len(self._buffer) else chunk
        patches = num_patches(len(self._buffer))
        if patches == 0:
            return torch.zeros((0, PATCH_FRAMES, MEL_BANDS), device=self.frontend.window.device)
        out = waveform_to_patches(self._buffer, self.frontend)
        self._buffer = self._buffer[patches * PATCH_HOP_SAMPLES :].copy()
        self.patches_emitted += patches
        return out
