"""The decoder process: ``python -m worker.media.decoder_child --fd N [--frames-fd M --frame-slots K
--slot-bytes B]``, started by :class:`worker.media.isolation.DecoderProcess`.

It serves one :class:`~worker.media.records.DecodeRequest` at a time on the inherited socket with the same
:class:`~worker.media.source.VideoSource` the in-process path uses, lock-step (one chunk per ``next``; see
:mod:`worker.media.wire`), until the socket closes. Frames go into the shared-memory slot the ``next``
offered (:class:`~worker.media.frame_slots.SlotWriter`, one copy here), or on the socket when it offered
none or they do not fit. It imports PyAV and NumPy, never torch (its imports
are this module's, loaded before it says ``ready``, so start-up is paid ahead of the first video; with
``audio_patches`` the log-mel patches are cut here, in NumPy, by :mod:`model.log_mel`). It
runs at :data:`DECODER_NICE`, dies with its parent (``PR_SET_PDEATHSIG``), ignores SIGINT (the parent
decides when it ends) and, with ``--memory-limit-mb``, runs under that ``RLIMIT_AS``. Every failure is
sent to the parent as that video's ``error``; the process lives on.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import resource
import signal
import socket
import sys

import av.error
import numpy as np

from worker.errors import TagstreamError, TooLargeError
from worker.media.frame_slots import SlotWriter
from worker.media.open import map_av_error
from worker.media.records import AudioChunk, DecodeRequest, FrameChunk
from worker.media.source import VideoSource
from worker.media.wire import recv_header, send

#: Decoder processes run at this niceness above the worker: when cores are short the worker's batcher and
#: inference threads go first, so videos already decoded finish (and free their job slots) before more are
#: decoded. With spare cores it changes nothing. scripts/bench_worker.py on 2 cores: p50 end-to-end
#: latency 2.4 s -> 1.4 s at the same throughput (BENCHMARKS.md "Worker").
DECODER_NICE = 10


def serve(sock: socket.socket, request: DecodeRequest, slots: SlotWriter) -> None:
    """Decode one video for the parent, one chunk per ``next``, until done or told to stop."""
    with VideoSource.open(request) as src:
        send(sock, {"t": "open", "info": src.info.to_dict()})
        chunks = src.chunks()
        while True:  # lock-step: one chunk per "next", so the child never decodes ahead of its consumer
            command = recv_header(sock)
            if command["t"] != "next":
                send(sock, {"t": "stopped", "rss_kb": rss_kb()})
                return
            chunk = next(chunks, None)
            if chunk is None:
                break
            if isinstance(chunk, FrameChunk):
                frames = np.ascontiguousarray(chunk.frames, np.uint8)
                header = {"t": "frames", "n": len(frames), "ts": [float(t) for t in chunk.timestamps]}
                slot = command.get("slot", -1)
                if slots.write(slot, frames):
                    send(sock, {**header, "slot": slot})
                else:
                    send(sock, {**header, "slot": -1}, frames)
            elif isinstance(chunk, AudioChunk):
                samples = np.ascontiguousarray(chunk.samples, np.float32)
                send(sock, {"t": "audio", "start": float(chunk.start_s), "n": int(samples.size)}, samples)
            else:
                patches = np.ascontiguousarray(chunk.patches, np.float32)
                send(sock, {"t": "patches", "start": float(chunk.start_s), "n": len(patches)}, patches)
        send(sock, {"t": "done", "info": src.info.to_dict(), "stats": src.stats.to_dict(), "rss_kb": rss_kb()})


def rss_kb() -> int:
    """Peak resident set size of this process, in KiB."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux: EOF on the socket still ends us
        pass


def _error_header(exc: BaseException, uri: str, memory_limit_mb: int) -> dict[str, object]:
    """The ``error`` message for a failed video (an FFmpeg error that escaped VideoSource's own mapping
    is still the bytes' fault; MemoryError means the address-space limit)."""
    if isinstance(exc, MemoryError):
        exc = TooLargeError(f"decoding needs more than {memory_limit_mb} MB")
    elif isinstance(exc, av.error.FFmpegError):
        exc = map_av_error(exc, uri)
    if isinstance(exc, TagstreamError):
        reason, message, detail = exc.reason, str(exc), exc.detail
    else:
        reason, message, detail = "internal_error", f"{type(exc).__name__}: {exc}", {}
    return {"t": "error", "reason": reason, "message": message[:2000], "rss_kb": rss_kb(),
            "detail": {k: v for k, v in detail.items() if isinstance(v, str | int | float)}}


def main(argv: list[str] | None = None) -> int:
    """Serve requests on the inherited socket until EOF."""
    parser = argparse.ArgumentParser(prog="python -m worker.media.decoder_child")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--frames-fd", type=int, default=-1, help="the shared frame slots (none: all on the socket)")
    parser.add_argument("--frame-slots", type=int, default=0)
    parser.add_argument("--slot-bytes", type=int, default=0)
    parser.add_argument("--memory-limit-mb", type=int, default=0)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s decoder[%(process)d] %(message)s")
    _die_with_parent()
    os.nice(DECODER_NICE)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when a child ends
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    slots = SlotWriter(args.frames_fd, args.frame_slots, args.slot_bytes)  # mapped before the limit; it counts
    if args.memory_limit_mb > 0:
        limit = args.memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sock = socket.socket(fileno=args.fd)
    send(sock, {"t": "ready", "pid": os.getpid()})
    while True:
        try:
            header = recv_header(sock)
        except (EOFError, ConnectionError):
            return 0
        uri = ""
        try:
            request = DecodeRequest.from_wire(header["request"])
            uri = request.uri
            serve(sock, request, slots)
        except (BrokenPipeError, ConnectionError):
            return 0
        except Exception as exc:  # noqa: BLE001 - every failure is reported as this video's error
            try:
                send(sock, _error_header(exc, uri, args.memory_limit_mb))
            except (BrokenPipeError, ConnectionError):
                return 0


if __name__ == "__main__":
    sys.exit(main())
