"""VGGish audio embeddings (torchvggish layout) and the weight-free default, behind one AudioExtractor.

Network (follows harritaylor/torchvggish, whose weights are ported from Google's TF checkpoint):
conv64-pool-conv128-pool-conv256-conv256-pool-conv512-conv512-pool on a ``(N, 1, 96, 64)`` log-mel patch,
every conv 3x3/pad 1 + ReLU, pools 2x2; the ``(N, 512, 6, 4)`` map is permuted to channel-last
``(N, 6, 4, 512)`` before flattening (TF order, 12,288 values), then FC 4096 - ReLU - FC 4096 - ReLU -
FC 128. State-dict keys: ``features.{0,3,6,8,11,13}`` (convs), ``embeddings.{0,2,4}`` (FCs).

Interpretation: torchvggish applies a ReLU after the last FC too (Google's current TF reference does
not). We follow torchvggish by default (``final_relu=True``) so embeddings match that port's; pass
``final_relu=False`` to match Google's current model (the id then gets ``-norelu``).

PCA post-processing (optional, as torchvggish's ``Postprocessor``): ``(emb - pca_means) @ pca_eigen_vectors.T``,
clip to [-2, 2], quantise to 8 bits ``round((x + 2) * 255 / 4)`` (values 0..255). For the fusion model the
AudioExtractor dequantises like YouTube-8M's reader: ``q * 4 / 255 + (-2 + 4 / 512)``, so features are
floats in about [-2, 2], the scale of the released AudioSet / YouTube-8M / MVT audio features.

Without a VGGish file the default is ``logmel-stats.v1``: per mel band, the mean (64 values) then the
population standard deviation (64 values) of the patch's 96 log-mel frames. It needs no weights, is
deterministic, and keeps the 128-d, one-row-per-0.96-s interface; it is a weak stand-in for VGGish.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.audio_frontend import MEL_BANDS, PATCH_FRAMES, LogMelFrontend, waveform_to_patches
from model.weights import file_sha12, load_state_dict_file, load_tensor_file, require_file

log = logging.getLogger(__name__)

EMBEDDING_SIZE = 128
QUANTIZE_MIN = -2.0
QUANTIZE_MAX = 2.0
LOGMEL_STATS_ID = "logmel-stats.v1"


def dequantize(q: torch.Tensor) -> torch.Tensor:
    """8-bit PCA codes (0..255) -> floats, as YouTube-8M's ``dequantize(feat, max=2, min=-2)``."""
    scale = QUANTIZE_MAX - QUANTIZE_MIN
    return q * (scale / 255.0) + (scale / 512.0 + QUANTIZE_MIN)


def _make_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 1
    for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = int(v)
    return nn.Sequential(*layers)


class VGGish(nn.Module):
    """VGGish in torchvggish's layout; ``forward((N, 96, 64) or (N, 1, 96, 64))`` -> ``(N, 128)``.

    With PCA parameters loaded (``set_pca``) the output is the quantised 0..255 code as float, like
    torchvggish with ``postprocess=True``; otherwise the raw embedding.
    """

    pca_eigen_vectors: torch.Tensor | None
    pca_means: torch.Tensor | None

    def __init__(self, final_relu: bool = True) -> None:
        super().__init__()
        self.final_relu = final_relu
        self.features = _make_features()
        tail: list[nn.Module] = [nn.ReLU(inplace=True)] if final_relu else []
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 4 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, EMBEDDING_SIZE),
            *tail,
        )
        self.register_buffer("pca_eigen_vectors", None)
        self.register_buffer("pca_means", None)

    @property
    def has_pca(self) -> bool:
        return self.pca_eigen_vectors is not None

    def set_pca(self, eigen_vectors: torch.Tensor | np.ndarray, means: torch.Tensor | np.ndarray) -> None:
        """Install PCA parameters: ``eigen_vectors`` (128, 128), rows are components; ``means`` (128,)."""
        ev = torch.as_tensor(np.asarray(eigen_vectors), dtype=torch.float32)
        mu = torch.as_tensor(np.asarray(means), dtype=torch.float32).reshape(-1)
        if ev.shape != (EMBEDDING_SIZE, EMBEDDING_SIZE) or mu.shape != (EMBEDDING_SIZE,):
            raise ValueError(f"bad PCA shapes: eigen vectors {tuple(ev.shape)}, means {tuple(mu.shape)}")
        device = self.embeddings[0].weight.device
        self.pca_eigen_vectors = ev.to(device)
        self.pca_means = mu.to(device)

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """Raw 128-d embeddings (no PCA)."""
        x = patches.unsqueeze(1) if patches.dim() == 3 else patches
        x = self.features(x)  # (N, 512, 6, 4)
        x = x.permute(0, 2, 3, 1).contiguous().flatten(1)  # TF channel-last order
        return self.embeddings(x)

    def postprocess(self, embeddings: torch.Tensor) -> torch.Tensor:
        """PCA, clip to [-2, 2], quantise to 0..255 (float), as torchvggish's ``Postprocessor``."""
        assert self.pca_eigen_vectors is not None and self.pca_means is not None
        pca = (embeddings.float() - self.pca_means) @ self.pca_eigen_vectors.T
        clipped = pca.clamp(QUANTIZE_MIN, QUANTIZE_MAX)
        return torch.round((clipped - QUANTIZE_MIN) * (255.0 / (QUANTIZE_MAX - QUANTIZE_MIN)))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        emb = self.embed(patches)
        return self.postprocess(emb) if self.has_pca else emb


def load_pca_file(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigen_vectors (128, 128), means (128,)) from torchvggish's ``.pth``, Google's ``.npz`` or
    ``.safetensors``; keys ``pca_eigen_vectors`` (or ``pca_matrix``) and ``pca_means``, optionally
    prefixed ``pproc.``."""
    raw = {k.removeprefix("pproc."): v for k, v in load_tensor_file(path).items()}
    ev = raw.get("pca_eigen_vectors", raw.get("pca_matrix"))
    mu = raw.get("pca_means")
    if ev is None or mu is None:
        raise ValueError(f"{path}: PCA file needs pca_eigen_vectors and pca_means, has {sorted(raw)}")
    return torch.as_tensor(np.asarray(ev), dtype=torch.float32), torch.as_tensor(
        np.asarray(mu), dtype=torch.float32
    ).reshape(-1)


def load_vggish(weights: str | Path, pca: str | Path | None = None, final_relu: bool = True) -> VGGish:
    """VGGish with weights from a torchvggish-layout state dict (``pproc.*`` keys are ignored: PCA comes
    only from ``pca``)."""
    state = load_state_dict_file(weights)
    ignored = [k for k in state if k.startswith("pproc.")]
    if ignored:
        log.info("%s: ignoring %s (pass the PCA file separately)", weights, ignored)
    state = {k: v for k, v in state.items() if not k.startswith("pproc.")}
    model = VGGish(final_relu=final_relu)
    model.load_state_dict(state, strict=True)
    if pca is not None:
        model.set_pca(*load_pca_file(pca))
    return model


class AudioExtractor(nn.Module):
    """16 kHz mono audio -> one 128-d row per 0.96 s patch, by VGGish or by log-mel statistics.

    ``patches(samples)`` runs the log-mel front end; ``forward(patches)`` embeds a batch of patches
    (from any number of videos). Output is float32 on the extractor's device.
    """

    feature_dim = EMBEDDING_SIZE

    def __init__(self, vggish: VGGish | None, extractor_id: str) -> None:
        super().__init__()
        self.frontend = LogMelFrontend()
        self.vggish = vggish
        self.extractor_id = extractor_id
        if vggish is not None:
            vggish.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.frontend.window.device

    def train(self, mode: bool = True) -> AudioExtractor:
        """Stays in eval mode: the extractor is frozen whatever the caller's mode."""
        return super().train(False)

    def patches(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(P, 96, 64) log-mel patches of 16 kHz mono float samples (remainder dropped)."""
        return waveform_to_patches(samples, self.frontend)

    @torch.inference_mode()
    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if patches.dim() != 3 or tuple(patches.shape[1:]) != (PATCH_FRAMES, MEL_BANDS):
            raise ValueError(f"expected (N, 96, 64) patches, got {tuple(patches.shape)}")
        x = patches.to(self.device, dtype=torch.float32)
        if len(x) == 0:
            return x.new_zeros((0, EMBEDDING_SIZE))
        if self.vggish is None:
            return torch.cat([x.mean(dim=1), x.std(dim=1, unbiased=False)], dim=1)
        if x.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                emb = self.vggish.embed(x)
            emb = emb.float()
        else:
            emb = self.vggish.embed(x)
        if self.vggish.has_pca:
            return dequantize(self.vggish.postprocess(emb))
        return emb.float()


def build_audio_extractor(
    vggish_weights: str | Path | None = None,
    pca_weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    final_relu: bool = True,
) -> AudioExtractor:
    """VGGish from a torchvggish-layout file (id ``vggish.<sha12>`` plus ``+pca`` with a PCA file), or,
    with no file, the weight-free ``logmel-stats.v1`` summary. A configured file that is missing raises
    FileNotFoundError."""
    if vggish_weights is None:
        if pca_weights is not None:
            raise ValueError("a VGGish PCA file was given without VGGish weights")
        log.info("no VGGish weights configured: audio features are %s", LOGMEL_STATS_ID)
        return AudioExtractor(None, LOGMEL_STATS_ID).to(device)
    weights = require_file(vggish_weights, "VGGish")
    pca = require_file(pca_weights, "VGGish PCA") if pca_weights is not None else None
    model = load_vggish(weights, pca, final_relu=final_relu)
    extractor_id = f"vggish.{file_sha12(weights)}" + ("" if final_relu else "-norelu")
    if pca is not None:
        extractor_id += "+pca"
    return AudioExtractor(model, extractor_id).to(device)
