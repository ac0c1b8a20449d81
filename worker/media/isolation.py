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
  then for frames/audio/patches the raw array bytes, received straight into a preallocated NumPy buffer.
  The parent never unpickles anything the child sends, and checks every header (shape = the requested
  crop or 96 x 64, counts bounded, audio or patches as the request asked), so a child subverted by a
  malicious file gains nothing in the worker beyond the right to fail its video.
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
    """One child process and the parent's end of its socket."""

    def __init__(self, memory_limit_mb: int = 0) -> None:
        parent, child = socket.socketpair()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "worker.media.decoder_child", "--fd", str(child.fileno()),
               "--memory-limit-mb", str(memory_limit_mb), "--log-level", logging.getLevelName(log.getEffectiveLevel())]
        self.proc = subprocess.Popen(cmd, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=env)
        child.close()
        self.sock = parent
        self.pid = self.proc.pid
        self.ready = False
        self.served = 0

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
    a request given to :meth:`open` carries its own."""

    def __init__(self, size: int, *, memory_limit_mb: int = 0, grace_s: float = 10.0,
                 open_policy: OpenPolicy | None = None, prestart: bool = True) -> None:
        self.size = max(1, size)
        self.memory_limit_mb = memory_limit_mb
        self.grace_s = grace_s
        self.open_policy = open_policy
        self.crashes = 0
        self.kills = 0
        self.peak_rss_kb = 0
        self._idle: list[DecoderProcess] = []
        self._busy: dict[int, tuple[DecoderProcess, str]] = {}
        self._cond = threading.Condition()
        self._closed = False
        if prestart:
            self._idle.extend(DecoderProcess(memory_limit_mb) for _ in range(self.size))

    @classmethod
    def from_settings(cls, settings: Settings, size: int, *, software: bool = True) -> DecodePool:
        """The worker's pool: its open policy, and its memory limit when decoding in software."""
        return cls(size, memory_limit_mb=settings.decode_memory_limit_mb if software else 0,
                   open_policy=OpenPolicy.from_settings(settings))

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
                    proc = DecoderProcess(self.memory_limit_mb)
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
                self._idle.insert(0, DecoderProcess(self.memory_limit_mb))
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
        final."""
        s, patched = self.crop_size, self.request.audio_patches
        while not self._done:
            self._command("next")
            header = self._next()
            kind = header["t"]
            if kind == "frames":
                n, ts = _int(header.get("n")), header.get("ts")
                if not 0 < n <= MAX_FRAMES_PER_CHUNK or not isinstance(ts, list) or len(ts) != n:
                    self._protocol_error(header)
                frames = self._payload((n, s, s, 3), np.uint8)
                yield FrameChunk(np.asarray(ts, np.float64), frames)
            elif kind == "audio" and not patched:
                m, start = _int(header.get("n")), _float(header.get("start"))
                if not 0 < m <= MAX_AUDIO_SAMPLES_PER_CHUNK or start is None:
                    self._protocol_error(header)
                samples = self._payload((m,), np.float32)
                yield AudioChunk(start, samples)
            elif kind == "patches" and patched:
                n, start = _int(header.get("n")), _float(header.get("start"))
                if not 0 < n <= MAX_PATCHES_PER_CHUNK or start is None:
                    self._protocol_error(header)
                patches = self._payload((n, PATCH_FRAMES, MEL_BANDS), np.float32)
                yield PatchChunk(start, patches)
            elif kind == "done":
                self.info = self._media_info(header.get("info"))
                try:
                    self.stats = DecodeStats(**header.get("stats", {}))
                except TypeError:
                    self._protocol_error(header)
                self._finish(healthy=True, rss_kb=_int(header.get("rss_kb")))
            else:
                self._protocol_error(header)

    def _finish(self, *, healthy: bool, rss_kb: int = 0) -> None:
        if not self._done:
            self._done = True
            self._proc.served += 1
            self._pool._release(self._proc, healthy=healthy, rss_kb=rss_kb)

    def _command(self, kind: str) -> None:
        try:
            send(self._proc.sock, {"t": kind})
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
