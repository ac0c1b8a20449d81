"""VGGish in torchvggish's checkpoint layout, PCA post-processing, and the weight-free default."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from model.audio_frontend import SAMPLE_RATE, hertz_to_mel, waveform_to_patches
from model.vggish import (
    LOGMEL_STATS_ID,
    VGGish,
    build_audio_extractor,
    dequantize,
)

TORCHVGGISH_KEYS = {
    f"{prefix}.{i}.{p}"
    for prefix, idx in (("features", (0, 3, 6, 8, 11, 13)), ("embeddings", (0, 2, 4)))
    for i in idx
    for p in ("weight", "bias")
}


def tone(freq_hz: float, seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.5 * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


@pytest.fixture(scope="module")
def patches() -> torch.Tensor:
    """Log-mel patches of a chirp plus noise: varied, realistic-range inputs (4 patches)."""
    rng = np.random.default_rng(0)
    t = np.arange(4 * SAMPLE_RATE) / SAMPLE_RATE
    chirp = np.sin(2 * np.pi * (200 + 900 * t) * t) * 0.3 + rng.standard_normal(len(t)) * 0.02
    p = waveform_to_patches(chirp.astype(np.float32))
    assert p.shape == (4, 96, 64)
    return p


@pytest.fixture(scope="module")
def random_vggish(tmp_path_factory) -> tuple[VGGish, Path]:
    torch.manual_seed(0)
    model = VGGish().eval()
    path = tmp_path_factory.mktemp("vggish") / "vggish-random.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_layout_is_torchvggish(random_vggish) -> None:
    model, _ = random_vggish
    assert set(model.state_dict()) == TORCHVGGISH_KEYS
    assert sum(p.numel() for p in model.parameters()) == 72_141_184  # about 72 M, as published


def test_flatten_is_tf_channel_last(random_vggish, patches) -> None:
    model, _ = random_vggish
    with torch.no_grad():
        fmap = model.features(patches[:, None])
        assert fmap.shape == (4, 512, 6, 4)
        # torchvggish: transpose(1, 3) then transpose(1, 2) -> (N, H, W, C), then flatten
        x = torch.transpose(torch.transpose(fmap, 1, 3), 1, 2).contiguous().view(4, -1)
        assert torch.allclose(model.embed(patches), model.embeddings(x), atol=1e-6)
        # the NCHW order would give different embeddings: the order matters
        assert not torch.allclose(model.embeddings(fmap.flatten(1)), model.embeddings(x), atol=1e-4)


def test_state_dict_round_trip(random_vggish, patches) -> None:
    model, path = random_vggish
    extractor = build_audio_extractor(path)
    sha12 = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert extractor.extractor_id == f"vggish.{sha12}"
    assert extractor.feature_dim == 128
    with torch.no_grad():
        expected = model(patches)
    out = extractor(patches)
    assert out.shape == (4, 128) and out.dtype == torch.float32
    assert torch.equal(out, expected)
    assert (out >= 0).all()  # torchvggish keeps a ReLU after the last FC
    no_relu = build_audio_extractor(path, final_relu=False)
    assert no_relu.extractor_id == f"vggish.{sha12}-norelu"
    assert (no_relu(patches) < 0).any()


def test_wrapped_and_prefixed_state_dict(random_vggish, patches, tmp_path) -> None:
    model, _ = random_vggish
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, wrapped)
    with torch.no_grad():
        assert torch.equal(build_audio_extractor(wrapped)(patches), model(patches))


def _pca_params(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((128, 128)))
    eigen = (q * rng.uniform(5.0, 50.0, size=(128, 1))).astype(np.float32)  # rows scaled: whitening-like
    means = rng.uniform(0.0, 0.05, size=128).astype(np.float32)
    return eigen, means


@pytest.mark.parametrize("fmt", ["pth-numpy", "npz"])
def test_pca_file_round_trip(random_vggish, patches, tmp_path, fmt) -> None:
    model, path = random_vggish
    eigen, means = _pca_params()
    if fmt == "npz":  # Google's vggish_pca_params.npz layout
        pca_path = tmp_path / "pca.npz"
        np.savez(pca_path, pca_eigen_vectors=eigen, pca_means=means.reshape(-1, 1))
    else:  # torchvggish's .pth: a dict of NumPy arrays
        pca_path = tmp_path / "pca.pth"
        torch.save({"pca_eigen_vectors": eigen, "pca_means": means}, pca_path)
    extractor = build_audio_extractor(path, pca_path)
    assert extractor.extractor_id.endswith("+pca") and extractor.extractor_id.startswith("vggish.")
    out = extractor(patches)

    with torch.no_grad():
        raw = model.embed(patches).double().numpy()
    pca = (raw - means.astype(np.float64)) @ eigen.astype(np.float64).T
    codes = np.round((np.clip(pca, -2.0, 2.0) + 2.0) * 255.0 / 4.0)
    expected = codes * 4.0 / 255.0 + (4.0 / 512.0 - 2.0)  # YouTube-8M dequantisation
    diff = np.abs(out.double().numpy() - expected)
    assert diff.max() <= 4.0 / 255.0 + 1e-5  # at most one quantum (float32 rounding at a boundary)
    assert (diff > 1e-5).mean() < 0.01
    assert len(np.unique(codes)) > 100  # the check is not vacuous: codes spread over the range
    assert (codes == 0).any() and (codes == 255).any()  # clipping is exercised
    assert out.min() >= -2.0 and out.max() <= 2.0 + 4 / 512


def test_dequantize_range() -> None:
    assert dequantize(torch.tensor(0.0)).item() == pytest.approx(-2.0 + 4 / 512)
    assert dequantize(torch.tensor(255.0)).item() == pytest.approx(2.0 + 4 / 512)


def test_missing_files_raise(tmp_path, random_vggish) -> None:
    _, path = random_vggish
    with pytest.raises(FileNotFoundError, match="VGGish"):
        build_audio_extractor(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="PCA"):
        build_audio_extractor(path, tmp_path / "nope-pca.pth")
    with pytest.raises(ValueError):
        build_audio_extractor(None, tmp_path / "pca.pth")


def test_default_is_logmel_stats_with_distinct_tones() -> None:
    extractor = build_audio_extractor()
    assert extractor.extractor_id == LOGMEL_STATS_ID and extractor.feature_dim == 128
    assert extractor.vggish is None and not list(extractor.parameters())  # weight-free
    edges_mel = np.linspace(hertz_to_mel(125.0), hertz_to_mel(7500.0), 66)
    centres_hz = 700.0 * (np.exp(edges_mel[1:-1] / 1127.0) - 1.0)
    dominant = {}
    for freq in (1000.0, 4000.0):
        feats = extractor(extractor.patches(tone(freq)))
        assert feats.shape == (2, 128)
        means = feats[:, :64]
        band = int(means[0].argmax())
        assert abs(band - int(np.abs(centres_hz - freq).argmin())) <= 1
        assert torch.equal(means.argmax(dim=1), torch.tensor([band, band]))
        dominant[freq] = band
    assert dominant[4000.0] > dominant[1000.0] + 10


def test_logmel_stats_are_band_mean_then_std(patches) -> None:
    feats = build_audio_extractor()(patches).numpy()
    p = patches.numpy().astype(np.float64)
    np.testing.assert_allclose(feats[:, :64], p.mean(axis=1), atol=1e-5)
    np.testing.assert_allclose(feats[:, 64:], p.std(axis=1), atol=1e-5)


def test_forward_checks_shape() -> None:
    extractor = build_audio_extractor()
    with pytest.raises(ValueError):
        extractor(torch.zeros(2, 64, 96))
    assert extractor(torch.zeros(0, 96, 64)).shape == (0, 128)
