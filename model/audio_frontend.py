"""VGGish log-mel front end, in torch, exactly as Google's reference (``vggish_input`` / ``mel_features``).

The spec, its constants and the mel matrix live in :mod:`model.log_mel` (NumPy, which the decoder
processes use to cut patches without torch); they are re-exported here. This module is the same
computation in torch, batched, on CPU or GPU: :class:`LogMelFrontend` (used by :mod:`model.vggish`),
:func:`waveform_to_patches` and :class:`PatchStream`.

Framing is done with ``Tensor.unfold`` + ``torch.fft.rfft(n=512)`` rather than ``torch.stft``: ``stft`` centres
a 400-sample window inside a 512-sample frame, which shifts every frame by 56 samples relative to the
reference. ``unfold`` reproduces the reference framing exactly and is batched, on CPU or GPU.

Patch ``j`` covers samples ``[15360 j, 15360 j + 15600)``; :class:`PatchStream` uses that to cut patches
from audio that arrives in chunks, with results identical to cutting the whole waveform at once.
"""

from __future__ import annotations

import numpy as np
import torch

from model.log_mel import (
    FFT_LENGTH,
    HOP_SAMPLES,
    LOG_OFFSET,
    MEL_BANDS,
    PATCH_FRAMES,
    PATCH_HOP_SAMPLES,
    PATCH_SECONDS,
    PATCH_SPAN_SAMPLES,
    SAMPLE_RATE,
    WINDOW_SAMPLES,
    hertz_to_mel,
    mel_matrix,
    num_patches,
    periodic_hann,
)

__all__ = [  # the spec's names that other modules import from here, and this module's own
    "MEL_BANDS", "PATCH_FRAMES", "PATCH_SECONDS", "SAMPLE_RATE", "LogMelFrontend", "PatchStream", "hertz_to_mel",
    "num_patches", "waveform_to_patches",
]  # fmt: skip


class LogMelFrontend(torch.nn.Module):
    """Batched VGGish log-mel spectrogram: ``(B, n)`` float waveform -> ``(B, frames, 64)`` float32.

    Computation runs in float32 on the input's device (the module's buffers follow ``.to(device)``);
    against a float64 NumPy reference the difference is about 1e-4 in log-mel units.
    """

    window: torch.Tensor
    mel: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.from_numpy(periodic_hann()).float(), persistent=False)
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
