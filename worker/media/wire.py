"""The framing between the worker and its decoder processes (:mod:`worker.media.isolation`).

One message is a 4-byte big-endian length, a JSON object with a type ``"t"``, and for audio, patches and
frames sent on the socket the raw array bytes after it. Nothing is ever pickled. Headers are bounded by
:data:`MAX_HEADER_BYTES`.

Messages, parent to child: ``decode`` (with ``request``: a :meth:`DecodeRequest.to_wire` object), then
``next`` per chunk (with ``slot``: the shared-memory frame slot offered for this chunk, -1 for none; see
:mod:`worker.media.frame_slots`), or ``stop``. Child to parent: ``ready`` once started; ``open`` (with
``info``) after opening; per ``next`` one of ``frames`` (``n``, ``ts``, ``slot``: the offered slot, which
holds the n x S x S x 3 uint8 frames, or -1 and those bytes follow), ``audio`` (``start``, ``n``, then n
float32), ``patches`` (``start``, ``n``, then n x 96 x 64 float32 log-mel patches; instead of ``audio`` when
the request asks for ``audio_patches``) or ``done`` (``info``, ``stats``, ``rss_kb``); ``stopped`` after
``stop``; ``error`` (``reason``, ``message``, ``detail``, ``rss_kb``) whenever the video fails.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import numpy as np

_LEN = struct.Struct("!I")
MAX_HEADER_BYTES = 1 << 20


def send(sock: socket.socket, header: dict[str, Any], payload: np.ndarray | None = None) -> None:
    """Send one message (``payload``: a C-contiguous array sent as raw bytes after the header)."""
    data = json.dumps(header, separators=(",", ":")).encode()
    sock.sendall(_LEN.pack(len(data)) + data)
    if payload is not None:
        sock.sendall(memoryview(payload).cast("B"))


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; EOFError when the other side closed the connection."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("decoder process closed the connection")
        got += n


def recv_header(sock: socket.socket) -> dict[str, Any]:
    """Receive one header; ValueError when it is too large or not an object with a type."""
    raw = bytearray(_LEN.size)
    recv_exact(sock, memoryview(raw))
    (size,) = _LEN.unpack(raw)
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"header of {size} bytes")
    body = bytearray(size)
    recv_exact(sock, memoryview(body))
    header = json.loads(body)
    if not isinstance(header, dict) or not isinstance(header.get("t"), str):
        raise ValueError("header is not an object with a type")
    return header
