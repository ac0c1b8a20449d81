"""Weight files and devices: the helpers every extractor module shares.

``load_state_dict_file`` reads ``.safetensors`` or a ``torch.save`` file (with ``weights_only=True``, so a
file cannot run code; NumPy arrays inside, as in torchvggish's PCA file, are allowed). Wrappers such as
``{"state_dict": ...}`` / ``{"model": ...}`` and a ``module.`` prefix from DataParallel are removed.
``file_sha12`` is the first 12 hex digits of the file's SHA-256, used in extractor ids. ``resolve_device``
turns ``"auto"`` into a device.

Split out of :mod:`model.extractors` so that the extractor modules (image, text, vggish,
efficientnet_lite) import these helpers without importing the bundle that imports them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

try:  # where NumPy keeps the array constructor its pickles name: numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]


def file_sha12(path: str | Path) -> str:
    """First 12 hex digits of the SHA-256 of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def require_file(path: str | Path | None, what: str) -> Path:
    """``Path(path)`` if it is an existing file, else FileNotFoundError naming what it should hold."""
    if path is None:
        raise FileNotFoundError(f"{what}: no weights file was configured")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what}: weights file {str(p)!r} does not exist")
    return p


def _numpy_safe_globals() -> list[Any]:
    """Globals that ``torch.load(weights_only=True)`` needs to rebuild plain NumPy arrays."""
    out: list[Any] = [np.ndarray, np.dtype, _reconstruct]
    out.extend(type(np.dtype(t)) for t in ("f4", "f8", "f2", "i8", "i4", "u1", "?"))
    return out


def load_tensor_file(path: str | Path) -> dict[str, Any]:
    """Raw mapping stored in a ``.safetensors``, ``.npz`` or ``torch.save`` file (safe loaders only)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return dict(load_file(str(p), device="cpu"))
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        obj = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{p}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict from a weights file, unwrapped (``state_dict`` / ``model`` keys, ``module.`` prefix)."""
    obj = load_tensor_file(path)
    for key in ("state_dict", "model", "model_state_dict"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        name = k[len("module.") :] if k.startswith("module.") else k
        out[name] = torch.as_tensor(v)
    return out


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else as given."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
