"""Sampled-frame conversion: a decoded frame to an RGB centre crop of its display image, with swscale.

:func:`to_rgb` returns the display image (the frame turned by ``frame.rotation``, the counter-clockwise
display-matrix angle) resized so that its short side is ``resize_short`` and centre-cropped to
``crop_size`` x ``crop_size``, as (crop, crop, 3) uint8 RGB. Scaling is bilinear, single-threaded, with
one ``VideoReformatter`` per thread (PyAV otherwise builds a scaler per call).

For 8-bit 4:2:0 frames (``yuv420p``/``yuvj420p``, what software decoders of H.264/HEVC/VP9/AV1 give for
ordinary video) the crop is taken first, on the decoded planes: the smallest chroma-aligned rectangle
that covers the centred square of ``crop_size * short_side / resize_short`` source pixels is scaled by
the same factor and the exact crop cut from it. That is the same picture as scaling the whole frame (to
within half an output pixel of position and the edge pixels' filter taps) for about half the swscale
work. Other formats are scaled whole and cropped after.
"""

from __future__ import annotations

import threading

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

__all__ = ["to_rgb"]

_CROP_FIRST = frozenset({"yuv420p", "yuvj420p"})


class _ThreadReformatter(threading.local):
    """One VideoReformatter per thread, made on first use in that thread."""

    def __init__(self) -> None:
        self.reformatter = VideoReformatter()


_local = _ThreadReformatter()


def _reformatter() -> VideoReformatter:
    """The calling thread's VideoReformatter."""
    return _local.reformatter


def _crop_planes(frame: av.VideoFrame, x0: int, y0: int, w: int, h: int) -> av.VideoFrame:
    """The ``w`` x ``h`` rectangle at (``x0``, ``y0``) of a 4:2:0 frame as a new frame (``x0``, ``y0``,
    ``w`` even, ``h`` a multiple of 4: the layout ``VideoFrame.from_numpy_buffer`` wraps without a copy)."""
    buf = np.empty((h * 3 // 2, w), np.uint8)
    planes = frame.planes
    luma = np.frombuffer(planes[0], np.uint8).reshape(-1, planes[0].line_size)
    buf[:h] = luma[y0 : y0 + h, x0 : x0 + w]
    for k, row in ((1, h), (2, h + h // 4)):
        chroma = np.frombuffer(planes[k], np.uint8).reshape(-1, planes[k].line_size)
        buf[row : row + h // 4] = chroma[y0 // 2 : (y0 + h) // 2, x0 // 2 : (x0 + w) // 2].reshape(h // 4, w)
    out = av.VideoFrame.from_numpy_buffer(buf, format=frame.format.name)
    out.colorspace, out.color_range = frame.colorspace, frame.color_range
    return out


def _span(centre_lo: float, size: float, limit: int, multiple: int) -> tuple[int, int]:
    """An even start and a length (a multiple of ``multiple``) covering [centre_lo, centre_lo + size]
    inside [0, limit]; (-1, 0) when it does not fit."""
    lo = int(np.floor(centre_lo)) & ~1
    n = -(-(int(np.ceil(centre_lo + size)) - lo) // multiple) * multiple
    if lo + n > limit:
        lo = (limit - n) & ~1
    return (lo, n) if lo >= 0 and lo + n <= limit else (-1, 0)


def to_rgb(frame: av.VideoFrame, resize_short: int, crop_size: int, rotation: int | None = None) -> np.ndarray:
    """(crop, crop, 3) uint8 RGB of ``frame``'s display image (see the module docstring).

    ``rotation`` (counter-clockwise degrees) defaults to ``frame.rotation``. Assumes
    ``resize_short >= crop_size``.
    """
    rot = int(round(((frame.rotation or 0) if rotation is None else rotation) / 90.0)) % 4
    w, h = frame.width, frame.height
    scale = resize_short / min(w, h)
    if frame.format.name in _CROP_FIRST:
        side = crop_size / scale  # the crop in source pixels, centred
        cx, cy = (w - side) / 2, (h - side) / 2
        (x0, cw), (y0, ch) = _span(cx, side, w, 2), _span(cy, side, h, 4)
        if cw and ch:
            ow, oh = max(crop_size, round(cw * scale)), max(crop_size, round(ch * scale))
            rgb = _reformatter().reformat(_crop_planes(frame, x0, y0, cw, ch), ow, oh, "rgb24",
                                          interpolation=Interpolation.BILINEAR, threads=1).to_ndarray()
            ox = min(ow - crop_size, max(0, round((cx - x0) * scale)))
            oy = min(oh - crop_size, max(0, round((cy - y0) * scale)))
            rgb = rgb[oy : oy + crop_size, ox : ox + crop_size]
            return np.ascontiguousarray(np.rot90(rgb, k=rot) if rot else rgb)
    disp_w, disp_h = (h, w) if rot % 2 else (w, h)
    out_w, out_h = max(crop_size, round(disp_w * scale)), max(crop_size, round(disp_h * scale))
    sw, sh = (out_h, out_w) if rot % 2 else (out_w, out_h)
    rgb = _reformatter().reformat(frame, sw, sh, "rgb24", interpolation=Interpolation.BILINEAR,
                                  threads=1).to_ndarray()
    if rot:
        rgb = np.rot90(rgb, k=rot)
    y0, x0 = (rgb.shape[0] - crop_size) // 2, (rgb.shape[1] - crop_size) // 2
    return np.ascontiguousarray(rgb[y0 : y0 + crop_size, x0 : x0 + crop_size])
