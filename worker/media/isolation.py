"""Decoder isolation: every video is decoded in a supervised child process.

Why: FFmpeg is a large C code base fed with bytes anyone who can write to the queue chooses. A native
crash (SIGSEGV, SIGABRT from an assertion, the kernel's OOM killer) inside the worker process would take
down every in-flight job and the resident models with it; a hang inside native code that ignores
FFmpeg's interrupt callback would pin a decode thread for ever. In a child process a crash becomes a
:class:`~worker.errors.DecoderCrashError` (``decoder_crash``) for that one video, a hang is cut off by a
hard deadline (``timeout``), and memory is capped per child (``RLIMIT_AS``, ``decode_memory_limit_mb``).

Design (interpretations):

- :class:`DecodePool` keeps up to ``size`` children (one per decode thread), started ahead of use. A
  child is ``python -m worker.media.decoder_child --fd N`` (:mod:`worker.media.decoder_child`): a fresh
  interpreter that imports PyAV and NumPy, not torch, and serves one video at a time with the same
  :class:`~worker.media.source.VideoSource` the in-process path uses. A dead child is replaced at once;
  the replacement's start-up (about 0.3 s) overlaps with other work.
- :meth:`DecodePool.open` takes the same :class:`~worker.media.records.DecodeRequest` as
  :meth:`VideoSource.open <worker.media.source.VideoSource.open>` and returns an :class:`IsolatedSource`
  with the same surface: typed errors from the constructor (open), ``chunks()`` yielding ``FrameChunk`` /
  ``AudioChunk`` (``PatchChunk`` with ``audio_patches``: the child cuts the log-mel patches, in NumPy, and
  sends them instead of the raw audio: 24.6 KB per 0.96 s instead of 61 KB, and no front end to run in
  the parent), ``info``, ``stats``, ``close()``, context manager.
- Wire format on a socketpair (:mod:`worker.media.wire`): a 4-byte big-endian length and a JSON header,
  then for audio/patches the raw array bytes, received straight into a preallocated NumPy buffer.
- Frames go through shared memory (:mod:`worker.media.frame_slots`): each process has its own region of
  ``frame_slots`` slots (default 4 x 2.4 MB, one chunk of 16 x 224 x 224 x 3 each); ``next`` offers a
  free slot, the child copies the chunk into it and its ``frames`` header names the slot, and the chunk's
  ``frames`` is a zero-copy view of the slot, which returns to the free list when the last view of it is
  gone. With no slot free (a consumer that keeps its frames), or a chunk that does not fit, the frames come
  on the socket as raw bytes. ``slot_chunks``/``socket_chunks`` count the two paths. The receive in this
  process is a header and a view, not a 2.4 MB ``recv_into`` per chunk.
- The parent never unpickles anything the child sends, and checks every header (shape = the requested
  crop or 96 x 64, counts bounded, audio or patches as the request asked, frames in the slot it offered or
  on the socket and nowhere else), so a child subverted by a malicious file gains nothing in the worker
  beyond the right to fail its video, and to rewrite frames it delivered earlier that the engine has not
  batched yet (:mod:`worker.media.frame_slots`, "Trust").
- Lock-step: the child decodes the next chunk only when the parent asks for it (``next``), exactly like
  the in-process generator, so it never runs ahead of a consumer that stops early (no extra audio
  request for an abandoned URL) and backpressure reaches it unchanged. A consumer that stops early sends
  ``stop``; the idle child closes the video and serves the next one.
- Hard deadline: ``open_timeout_s + decode_budget_s + grace_s`` from the request; the child's own
  (cooperative) budget fires first in all normal cases. Past it the child is killed (SIGKILL) and
  replaced.
- A child that dies mid-video (any signal or exit) fails only that video; its exit status is in the
  error's detail (``signal``).
- ``RLIMIT_AS`` is set only for software decoding (CUDA maps far more address space than it uses).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import numpy as np

from model.log_mel import MEL_BANDS, PATCH_FRAMES, PATCH_SPAN_SAMPLES, num_patches
from worker import errors
from worker.errors import DecoderCrashError, MediaTimeoutError, ShutdownError, TagstreamError
from worker.media.frame_slots import DEFAULT_SLOT_BYTES, DEFAULT_SLOTS, FrameSlots
from worker.media.open import OpenPolicy
from worker.media.records import (
    AudioChunk,
    DecodeLimits,
    DecodeRequest,
    DecodeStats,
    FrameChunk,
    MediaInfo,
    PatchChunk,
)
from worker.media.sampling import SamplingPolicy
from worker.media.wire import recv_exact, recv_header, send

if TYPE_CHECKING:
    from worker.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_FRAMES_PER_CHUNK = 1024
MAX_AUDIO_SAMPLES_PER_CHUNK = 16000 * 600
#: patches one chunk can complete: its samples plus fewer than one patch span carried over
MAX_PATCHES_PER_CHUNK = num_patches(MAX_AUDIO_SAMPLES_PER_CHUNK + PATCH_SPAN_SAMPLES)
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
_ERROR_CLASSES = {
    cls.reason: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, TagstreamError)
}


class DecoderProcess:
    """One child process, the parent's end of its socket and its own frame slots (``frame_slots`` 0: none)."""

    def __init__(self, memory_limit_mb: int = 0, frame_slots: int = 0, slot_bytes: int = 0) -> None:
        parent, child = socket.socketpair()
        self.slots = FrameSlots(frame_slots, slot_bytes)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        fds = (child.fileno(), self.slots.fd) if self.slots.fd >= 0 else (child.fileno(),)
        try:
            self.proc = subprocess.Popen(self.command(child.fileno(), memory_limit_mb), pass_fds=fds,
                                         stdin=subprocess.DEVNULL, env=env)  # fmt: skip
        finally:
            child.close()
            self.slots.close_fd()
        self.sock = parent
        self.pid = self.proc.pid
        self.ready = False
        self.served = 0

    def command(self, fd: int, memory_limit_mb: int) -> list[str]:
        """The child's command line, ``fd`` its end of the socket."""
        return [sys.executable, "-m", "worker.media.decoder_child", "--fd", str(fd), *self.slots.child_args(),
                "--memory-limit-mb", str(memory_limit_mb), "--log-level", logging.getLevelName(log.getEffectiveLevel())]

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        if self.ready:
            return
        self.sock.settimeout(timeout_s)
        try:
            header = recv_header(self.sock)
        except (OSError, EOFError, ValueError) as exc:
            self.kill()
            raise DecoderCrashError(f"decoder process did not start: {exc}", detail=self.exit_detail()) from None
        if header.get("t") != "ready":
            self.kill()
            raise DecoderCrashError("decoder process sent no ready message", detail=self.exit_detail())
        self.ready = True

    def exit_detail(self) -> dict[str, Any]:
        try:
            code = self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            return {"pid": self.pid}
        detail: dict[str, Any] = {"pid": self.pid, "exit_code": code}
        if code is not None and code < 0:
            detail["signal"] = signal.Signals(-code).name
        return detail

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            log.error("decoder process %d did not exit after SIGKILL", self.pid)
        self.sock.close()


class DecodePool:
    """Up to ``size`` supervised decoder processes; see the module docstring.

    ``open_policy`` is the policy of requests made with :meth:`source` (None: the permissive default);
    a request given to :meth:`open` carries its own. Each process gets ``frame_slots`` shared-memory slots
    of ``slot_bytes`` (0 slots: every frame chunk on the socket); ``slot_chunks``/``socket_chunks`` count
    the frame chunks received each way."""

    def __init__(self, size: int, *, memory_limit_mb: int = 0, grace_s: float = 10.0,
                 open_policy: OpenPolicy | None = None, prestart: bool = True, frame_slots: int = DEFAULT_SLOTS,
                 slot_bytes: int = DEFAULT_SLOT_BYTES) -> None:
        self.size = max(1, size)
        self.memory_limit_mb = memory_limit_mb
        self.grace_s = grace_s
        self.open_policy = open_policy
        self.frame_slots, self.slot_bytes = frame_slots, slot_bytes
        self.crashes = 0
        self.kills = 0
        self.peak_rss_kb = 0
        self.slot_chunks = 0
        self.socket_chunks = 0
        self._idle: list[DecoderProcess] = []
        self._busy: dict[int, tuple[DecoderProcess, str]] = {}
        self._cond = threading.Condition()
        self._closed = False
        if prestart:
            self._idle.extend(self._spawn() for _ in range(self.size))

    @classmethod
    def from_settings(cls, settings: Settings, size: int, *, software: bool = True,
                      slot_bytes: int = DEFAULT_SLOT_BYTES) -> DecodePool:
        """The worker's pool: its open policy, its memory limit when decoding in software, frame slots of
        ``slot_bytes`` (the caller's frame chunk)."""
        return cls(size, memory_limit_mb=settings.decode_memory_limit_mb if software else 0,
                   open_policy=OpenPolicy.from_settings(settings), slot_bytes=slot_bytes)

    def open(self, request: DecodeRequest) -> IsolatedSource:
        """Decode ``request`` in a child (blocks while all children are busy); typed errors as VideoSource."""
        return IsolatedSource(self, request)

    def source(self, uri: str, policy: SamplingPolicy, limits: DecodeLimits, **options: Any) -> IsolatedSource:
        """:meth:`open` of ``DecodeRequest(uri, policy, limits, open_policy=self.open_policy, **options)``."""
        return self.open(DecodeRequest(uri, policy, limits, open_policy=self.open_policy, **options))

    def active(self) -> dict[str, int]:
        """``{uri: pid}`` of the videos being decoded now."""
        with self._cond:
            return {uri: proc.pid for proc, uri in self._busy.values()}

    def pids(self) -> list[int]:
        with self._cond:
            return [p.pid for p in self._idle] + [p.pid for p, _ in self._busy.values()]

    def free_slots(self) -> dict[int, int]:
        """``{pid: free frame slots}`` of the living processes."""
        with self._cond:
            return {p.pid: p.slots.free() for p in [*self._idle, *(p for p, _ in self._busy.values())]}

    def _spawn(self) -> DecoderProcess:
        return DecoderProcess(self.memory_limit_mb, self.frame_slots, self.slot_bytes)

    def _acquire(self, uri: str) -> DecoderProcess:
        with self._cond:
            while True:
                if self._closed:
                    raise ShutdownError("the decode pool is closed")
                while self._idle and not self._idle[-1].alive():
                    self._idle.pop().kill()
                    self.crashes += 1
                if self._idle:
                    proc = self._idle.pop()
                    break
                if len(self._busy) < self.size:
                    proc = self._spawn()
                    break
                self._cond.wait(1.0)
            self._busy[proc.pid] = (proc, uri)
        try:
            proc.wait_ready()
        except DecoderCrashError:
            self._release(proc, healthy=False)
            raise
        return proc

    def _release(self, proc: DecoderProcess, *, healthy: bool, rss_kb: int = 0) -> None:
        if not healthy:
            proc.kill()
        with self._cond:
            self._busy.pop(proc.pid, None)
            self.peak_rss_kb = max(self.peak_rss_kb, rss_kb)
            if self._closed:
                if healthy:
                    proc.kill()
            elif healthy:
                self._idle.append(proc)
            else:  # replace it now so its start-up overlaps with other work
                self._idle.insert(0, self._spawn())
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            procs, self._idle = self._idle, []
            busy = [p for p, _ in self._busy.values()]
            self._cond.notify_all()
        for proc in procs + busy:
            proc.kill()


class IsolatedSource:
    """A video decoded in a pool child; the surface of :class:`worker.media.source.VideoSource`."""

    def __init__(self, pool: DecodePool, request: DecodeRequest) -> None:
        self.request = request
        self.uri, self.crop_size = request.uri, request.crop_size
        self.stats = DecodeStats()
        self._pool = pool
        self._done = False
        self._proc = pool._acquire(request.uri)  # waits for a free, started child: not charged to the video
        limits = request.limits
        self._deadline = time.monotonic() + limits.open_timeout_s + limits.decode_budget_s + pool.grace_s
        try:
            send(self._proc.sock, {"t": "decode", "request": request.to_wire()})
        except OSError:
            self._crashed()
        header = self._next()
        if header["t"] != "open":
            self._protocol_error(header)
        self.info = self._media_info(header.get("info"))

    # --- receiving ----------------------------------------------------------------------------------
    def _remaining(self) -> float:
        return self._deadline - time.monotonic()

    def _crashed(self) -> NoReturn:
        detail = {"uri": self.uri, **self._proc.exit_detail()}
        self._pool.crashes += 1
        self._finish(healthy=False)
        how = detail.get("signal") or f"exit code {detail.get('exit_code')}"
        raise DecoderCrashError(f"the decoder process died while decoding ({how})", detail=detail)

    def _timed_out(self) -> NoReturn:
        self._pool.kills += 1
        self._finish(healthy=False)
        raise MediaTimeoutError("decoder process passed its hard deadline and was killed", detail={"uri": self.uri})

    def _protocol_error(self, header: dict[str, Any]) -> NoReturn:
        self._finish(healthy=False)
        raise DecoderCrashError(f"decoder process broke the protocol ({str(header)[:200]})", detail={"uri": self.uri})

    def _recv(self, fn: Callable[[], T]) -> T:
        remaining = self._remaining()
        if remaining <= 0:
            self._timed_out()
        self._proc.sock.settimeout(remaining)
        try:
            return fn()
        except TimeoutError:
            self._timed_out()
        except (EOFError, ConnectionError):
            self._crashed()
        except (ValueError, OSError) as exc:
            self._protocol_error({"error": str(exc)})

    def _next(self) -> dict[str, Any]:
        header = self._recv(lambda: recv_header(self._proc.sock))
        if header["t"] == "error":
            self._finish(healthy=True, rss_kb=_int(header.get("rss_kb")))
            raise _error_from(header, self.uri)
        return header

    def _payload(self, shape: tuple[int, ...], dtype: type[np.generic]) -> np.ndarray:
        out = np.empty(shape, dtype)
        self._recv(lambda: recv_exact(self._proc.sock, memoryview(out).cast("B")))
        return out

    def _media_info(self, raw: object) -> MediaInfo:
        if not isinstance(raw, dict):
            self._protocol_error({"info": raw})
        try:
            return MediaInfo(**raw)
        except TypeError:
            self._protocol_error({"info": raw})

    def chunks(self) -> Iterator[FrameChunk | AudioChunk | PatchChunk]:
        """Frame and audio (or patch) chunks as the child's VideoSource yields them; then ``info``/``stats``
        final. Each ``next`` offers a free frame slot; one the answer did not fill is withdrawn at once."""
        slots = self._proc.slots
        while not self._done:
            slot = slots.offer()
            try:
                self._command({"t": "next", "slot": slot})
                chunk = self._receive(slot)
            finally:
                slots.withdraw(slot)
            if chunk is not None:
                yield chunk

    def _receive(self, slot: int) -> FrameChunk | AudioChunk | PatchChunk | None:
        """The answer to a ``next`` that offered ``slot``: a chunk, or None after ``done``."""
        header = self._next()
        kind, patched = header["t"], self.request.audio_patches
        if kind == "frames":
            return self._frames(header, slot)
        if kind == "audio" and not patched:
            m, start = _int(header.get("n")), _float(header.get("start"))
            if not 0 < m <= MAX_AUDIO_SAMPLES_PER_CHUNK or start is None:
                self._protocol_error(header)
            return AudioChunk(start, self._payload((m,), np.float32))
        if kind == "patches" and patched:
            n, start = _int(header.get("n")), _float(header.get("start"))
            if not 0 < n <= MAX_PATCHES_PER_CHUNK or start is None:
                self._protocol_error(header)
            return PatchChunk(start, self._payload((n, PATCH_FRAMES, MEL_BANDS), np.float32))
        if kind == "done":
            self.info = self._media_info(header.get("info"))
            try:
                self.stats = DecodeStats(**header.get("stats", {}))
            except TypeError:
                self._protocol_error(header)
            self._finish(healthy=True, rss_kb=_int(header.get("rss_kb")))
            return None
        self._protocol_error(header)

    def _frames(self, header: dict[str, Any], offered: int) -> FrameChunk:
        """A ``frames`` answer: in the slot that was offered (a view of it) or, with ``slot`` -1, on the
        socket; any other slot, a count out of bounds or frames that overflow the slot break the protocol."""
        n, ts, slot = _int(header.get("n")), header.get("ts"), header.get("slot")
        if not 0 < n <= MAX_FRAMES_PER_CHUNK or not isinstance(ts, list) or len(ts) != n or type(slot) is not int:
            self._protocol_error(header)
        try:
            timestamps = np.asarray(ts, np.float64)
        except (TypeError, ValueError):
            self._protocol_error(header)
        if timestamps.shape != (n,):
            self._protocol_error(header)
        shape = (n, self.crop_size, self.crop_size, 3)
        if slot == -1:
            self._pool.socket_chunks += 1
            return FrameChunk(timestamps, self._payload(shape, np.uint8))
        if slot != offered or not self._proc.slots.fits(shape):
            self._protocol_error(header)
        self._pool.slot_chunks += 1
        return FrameChunk(timestamps, self._proc.slots.view(offered, shape))

    def _finish(self, *, healthy: bool, rss_kb: int = 0) -> None:
        if not self._done:
            self._done = True
            self._proc.served += 1
            self._pool._release(self._proc, healthy=healthy, rss_kb=rss_kb)

    def _command(self, header: dict[str, Any]) -> None:
        try:
            send(self._proc.sock, header)
        except OSError:
            self._crashed()

    def close(self) -> None:
        """Stop early if needed: the child (idle between chunks) is told to stop and goes back to the
        pool; one that does not answer within ``STOP_TIMEOUT_S`` is killed and replaced."""
        if self._done:
            return
        try:
            send(self._proc.sock, {"t": "stop"})
            self._proc.sock.settimeout(STOP_TIMEOUT_S)
            header = recv_header(self._proc.sock)
            if header["t"] in ("stopped", "done", "error"):
                self._finish(healthy=True, rss_kb=_int(header.get("rss_kb")))
                return
        except (OSError, EOFError, ValueError):
            pass
        self._pool.kills += 1
        self._finish(healthy=False)

    def __enter__(self) -> IsolatedSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def _float(value: object) -> float | None:
    """A finite JSON number as a float; None for anything else."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _error_from(header: dict[str, Any], uri: str) -> TagstreamError:
    cls = _ERROR_CLASSES.get(str(header.get("reason")), TagstreamError)
    raw = header.get("detail")
    items = raw.items() if isinstance(raw, dict) else ()
    detail = {str(k)[:64]: (v[:2000] if isinstance(v, str) else v) for k, v in items if isinstance(v, str | int | float)}
    detail["uri"] = uri
    return cls(str(header.get("message", ""))[:2000], detail=detail)
