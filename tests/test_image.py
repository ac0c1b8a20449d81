"""Image extractors on real photos from the scikit-image wheel, and ResNet-50 weight loading."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.image import IMAGENET_MEAN, IMAGENET_STD, ImageExtractor, build_image_extractor

# photo -> ImageNet classes of which at least one must be in the top 5
EXPECTED = {
    "chelsea.png": {281, 282, 283, 284, 285},  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "coffee.png": {967, 968},  # espresso, cup
    "rocket.jpg": {657, 744, 812},  # missile, projectile, space shuttle
    "motorcycle_left.png": {665, 670},  # moped, motor scooter
    "camera.png": {872},  # tripod (the cameraman photo)
}


def skimage_photo(name: str) -> Path:
    spec = importlib.util.find_spec("skimage")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "data" / name


def resize_crop(path: Path, short: int = 256, crop: int = 224) -> np.ndarray:
    """What the decoder delivers: short side resized to 256 (bilinear), centre crop 224, uint8 RGB."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    scale = short / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
    w, h = image.size
    left, top = (w - crop) // 2, (h - crop) // 2
    return np.asarray(image.crop((left, top, left + crop, top + crop)))


@pytest.fixture(scope="module")
def lite0() -> ImageExtractor:
    return build_image_extractor()


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return torch.from_numpy(np.stack([resize_crop(skimage_photo(n)) for n in EXPECTED]))


def test_efficientnet_lite0_recognises_real_photos(lite0: ImageExtractor, photos: torch.Tensor) -> None:
    assert lite0.extractor_id == "efficientnet_lite0.imagenet"
    assert (lite0.feature_dim, lite0.input_size, lite0.resize_short) == (1280, 224, 256)
    features, logits = lite0(photos)
    assert features.shape == (len(EXPECTED), 1280) and logits.shape == (len(EXPECTED), 1000)
    assert features.dtype == torch.float32 and logits.dtype == torch.float32
    top5 = logits.topk(5, dim=1).indices.tolist()
    for (name, wanted), top in zip(EXPECTED.items(), top5, strict=True):
        labels = [lite0.class_names[i] for i in top]
        assert wanted & set(top), f"{name}: top-5 {top} {labels}, expected one of {sorted(wanted)}"
    assert top5[0][0] in EXPECTED["chelsea.png"]  # the cat is the top-1, not just in the top 5


def test_class_names_are_imagenet(lite0: ImageExtractor) -> None:
    names = lite0.class_names
    assert len(names) == 1000
    assert names[281] == "tabby" and names[967] == "espresso"


def test_batch_independent_of_batch_composition(lite0: ImageExtractor, photos: torch.Tensor) -> None:
    features, logits = lite0(photos)
    one_f, one_l = lite0(photos[1:2])
    assert torch.allclose(one_f[0], features[1], atol=1e-4)
    assert torch.allclose(one_l[0], logits[1], atol=1e-3)
    assert not torch.allclose(features[0], features[1], atol=1e-2)


def test_normalisation_happens_inside(lite0: ImageExtractor, photos: torch.Tensor) -> None:
    # Feeding the backbone a manually normalised batch gives the same features as forward(uint8).
    x = photos.permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        manual = lite0.backbone(x)
    assert torch.allclose(manual, lite0(photos)[0], atol=1e-5)


def test_bad_input_rejected(lite0: ImageExtractor) -> None:
    with pytest.raises(ValueError):
        lite0(torch.zeros(2, 224, 224, 3, dtype=torch.float32))
    with pytest.raises(ValueError):
        lite0(torch.zeros(2, 3, 224, 224, dtype=torch.uint8))
    f, lg = lite0(torch.zeros(0, 224, 224, 3, dtype=torch.uint8))
    assert f.shape == (0, 1280) and lg.shape == (0, 1000)


@pytest.mark.parametrize("arch,dim", [("resnet50", 2048), ("mobilenet_v3_small", 576)])
def test_torchvision_state_dict_loads(tmp_path: Path, photos: torch.Tensor, arch: str, dim: int) -> None:
    import torchvision.models

    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(weights=None).eval()
    path = tmp_path / f"{arch}-random.pth"
    torch.save(reference.state_dict(), path)

    extractor = build_image_extractor(arch, path)
    assert extractor.feature_dim == dim
    assert extractor.extractor_id == f"{arch}." + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    batch = photos[:2]
    features, logits = extractor(batch)
    assert features.shape == (2, dim) and logits.shape == (2, 1000)

    pooled = {}
    reference.avgpool.register_forward_hook(lambda _m, _i, out: pooled.setdefault("x", out.flatten(1)))
    x = batch.permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref_logits = reference(x)
    assert torch.allclose(features, pooled["x"], atol=1e-5, rtol=1e-5)
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_missing_weights_never_fall_back_to_random(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ResNet-50"):
        build_image_extractor("resnet50")
    with pytest.raises(FileNotFoundError, match="MobileNetV3-Small"):
        build_image_extractor("mobilenet_v3_small")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_image_extractor("resnet50", tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError):
        build_image_extractor("efficientnet_lite0", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="unknown image arch"):
        build_image_extractor("vit_b16")


def test_wrong_weights_file_is_refused(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    path = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(RuntimeError):
        build_image_extractor("resnet50", path)
    with pytest.raises(ValueError, match="EfficientNet-Lite0"):
        build_image_extractor("efficientnet_lite0", path)


def test_extractor_stays_frozen(lite0: ImageExtractor) -> None:
    lite0.train()
    assert not lite0.training and not lite0.backbone.training
    assert not any(p.requires_grad for p in lite0.parameters())
