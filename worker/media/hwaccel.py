"""Hardware decoding: FFmpeg's CUDA hwaccel (NVDEC), and the probe that decides whether ``auto`` uses it.

NVDEC is not faster by itself. The only measurement (BENCHMARKS.md "GPU", one H200, 16 cores) had one
video alone decode in 0.76 s wall / 0.61 s CPU with NVDEC against 1.62 s / 1.56 s in software, yet sixteen
decoder processes with NVDEC delivered 3.07 one-minute videos/s against 11.24 in software: the sixteen CUDA
contexts serialised on the decoder engines. So ``hwaccel=auto`` takes NVDEC only where it was measured
faster on the machine itself, under the load the worker would put on it (:func:`choose_hwaccel`).

Interpretations:

- :func:`make_hwaccel` and :func:`cuda_device_options` build what :func:`worker.media.open.open_input` is
  given; a video that cannot be opened with it is decoded in software (:mod:`worker.media.source`).
- The probe (``python -m worker.media.hwaccel``; :func:`run_probe` runs it as a subprocess so that its CUDA
  contexts never meet torch's in the worker's process, and kills it after ``timeout_s``) decodes a clip with
  the worker's own decoder processes (:class:`~worker.media.isolation.DecodePool`, hence
  :class:`~worker.media.source.VideoSource` and the worker's sampling): in software, one process, one
  warm-up video then one measured; with ``cuda`` the same; and, when that one really decoded on NVDEC, with
  ``streams`` fresh processes at once (one warm-up video each, then :data:`PROBE_ROUNDS` measured each): as
  many NVDEC sessions as the worker would run, so that their contention is in the figures. Without a clip it
  encodes one (:func:`make_probe_clip`) into a temporary directory.
- Figures of a :class:`DecodeMeasurement`: ``wall_s`` is the wall time per video with ``streams`` videos in
  flight (elapsed x streams / videos), ``cpu_s`` the CPU time per video of the decoder processes
  (``/proc/<pid>/stat``) and of the probe's receiving threads, ``frames_decoded`` per video, ``used`` what
  the decoders report (``DecodeStats.hwaccel``: the path every video took, or ``mixed``).
- The clip is short, so per-video fixed costs (opening, creating the NVDEC decoder) weigh more than on a
  long video: the comparison leans towards software, the safe side.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import av
import numpy as np
from av.codec.hwaccel import HWAccel, hwdevices_available

from worker.media.isolation import DecodePool
from worker.media.records import DecodeLimits, DecodeRequest, DecodeStats
from worker.media.sampling import SamplingPolicy

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 20.0
"""How long :func:`run_probe` lets the probe run before it kills it (then ``auto`` is software)."""
PROBE_ROUNDS = 2
"""Measured videos per decoder process when several NVDEC sessions run at once."""
NVDEC_MARGIN = 1.10
"""NVDEC must be estimated this much faster than software decoding for ``auto`` to take it."""
PROBE_LIMITS = DecodeLimits(
    max_duration_s=3600.0,
    max_pixels=4096 * 2304,
    max_file_bytes=2**31,
    open_timeout_s=10.0,
    read_timeout_s=10.0,
    decode_budget_s=15.0,
)
CLIP_SIZE = (1280, 720)
CLIP_FPS = 25
CLIP_SECONDS = 8.0


# --- the hwaccel FFmpeg opens a video with -----------------------------------------------------------


def cuda_listed() -> bool:
    """Whether PyAV's FFmpeg was built with the ``cuda`` hwdevice (it says nothing about a GPU)."""
    return "cuda" in hwdevices_available()


def make_hwaccel(kind: str) -> HWAccel | None:
    """An ``HWAccel`` for ``kind`` ("cuda", or "auto" = cuda when FFmpeg lists it), else None.

    Each decoder's CUDA device context is the device's *primary* context, shared by every decoder of
    this process, when that is possible (see :func:`cuda_device_options`); otherwise FFmpeg's default,
    a new CUDA context per decoder. Returns None (software decoding) on any error; the caller also falls
    back when opening with it fails.
    """
    if kind not in ("cuda", "auto"):
        return None
    try:
        if kind == "auto" and not cuda_listed():
            return None
        return HWAccel("cuda", allow_software_fallback=True, options=cuda_device_options())
    except Exception as exc:  # noqa: BLE001 - any failure means software decoding
        log.info("hardware decoding unavailable (%s); using software", exc)
        return None


_cuda_lock = threading.Lock()
_cuda_keepalive: object | None = None  # a hardware device context holding a reference to the primary context
_cuda_shared: bool | None = None  # None: not tried yet in this process


def cuda_device_options() -> dict[str, str]:
    """``{"primary_ctx": "1"}`` when this process can share the CUDA device's primary context between
    its decoders, else ``{}``.

    FFmpeg's CUDA device context otherwise calls ``cuCtxCreate`` for every decoder, so every video
    creates and destroys a whole CUDA context (hundreds of MB, a driver-wide lock). With
    ``primary_ctx`` it retains the device's primary context instead, which FFmpeg requires to be
    inactive or already set to ``CU_CTX_SCHED_BLOCKING_SYNC``: it refuses (ENOTSUP) a primary context
    that torch activated with its own flags, as in a process that runs the models and decodes in
    threads (``decode_isolation`` off). The first call probes by creating one device context that is
    kept for the life of the process: it also keeps the primary context alive between videos (the
    last release would destroy it).
    """
    global _cuda_keepalive, _cuda_shared
    with _cuda_lock:
        if _cuda_shared is None:
            try:
                options = {"primary_ctx": "1"}
                _cuda_keepalive = HWAccel("cuda", options=options).create(av.Codec("h264", "r"))
                _cuda_shared = True
            except Exception as exc:  # noqa: BLE001 - no device, or the primary context is torch's
                log.info("CUDA primary context not shareable (%s); one CUDA context per decoder", exc)
                _cuda_shared = False
        return {"primary_ctx": "1"} if _cuda_shared else {}


# --- what the probe measured, and the choice -------------------------------------------------------------


@dataclass(frozen=True)
class DecodeMeasurement:
    """One path of the probe: ``hwaccel`` asked for, ``used`` as the decoders report it, figures per video
    (see the module docstring); ``error`` when it failed, then the figures are zero."""

    hwaccel: str
    streams: int = 1
    videos: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    frames_decoded: float = 0.0
    used: str = "none"
    error: str | None = None

    def describe(self) -> str:
        where = f"{self.hwaccel} x{self.streams}"
        if self.error is not None:
            return f"{where}: failed ({self.error})"
        return (
            f"{where}: {self.wall_s:.3f} s wall, {self.cpu_s:.3f} s CPU, {self.frames_decoded:g} frames "
            f"decoded per video ({self.videos} videos), used {self.used}"
        )


@dataclass(frozen=True)
class HwaccelProbe:
    """The probe's result: ``software`` and ``cuda`` one video alone, ``cuda_sessions`` with several
    decoder processes at once (None when NVDEC did not work alone or one stream was asked for); ``error``
    when the probe itself failed (timed out, crashed, unreadable output)."""

    software: DecodeMeasurement | None = None
    cuda: DecodeMeasurement | None = None
    cuda_sessions: DecodeMeasurement | None = None
    clip: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> HwaccelProbe:
        paths = ("software", "cuda", "cuda_sessions")
        return cls(
            **{k: v for k, v in raw.items() if k not in paths},
            **{k: DecodeMeasurement(**raw[k]) if raw.get(k) else None for k in paths},
        )

    @property
    def nvdec(self) -> DecodeMeasurement | None:
        """The NVDEC measurement with the most sessions (None: NVDEC was not measured)."""
        return self.cuda_sessions or self.cuda

    def nvdec_decoded(self) -> bool:
        """Whether NVDEC really decoded in the probe (no failure, no fallback to software)."""
        nvdec = self.nvdec
        return self.error is None and nvdec is not None and nvdec.error is None and nvdec.used == "cuda"

    def describe(self) -> str:
        if self.error is not None:
            return f"probe failed: {self.error}"
        paths = (self.software, self.cuda, self.cuda_sessions)
        return "; ".join(m.describe() for m in paths if m is not None)


@dataclass(frozen=True)
class HwaccelChoice:
    """What the decoders use (``none`` or ``cuda``), why, and the probe behind it (None: none ran)."""

    hwaccel: str
    reason: str
    probe: HwaccelProbe | None = None


def _rate(videos: float, seconds: float) -> float:
    return videos / seconds if seconds > 0 else math.inf


def choose_hwaccel(
    setting: str,
    *,
    gpu: bool,
    cuda_listed: bool,
    probe: Callable[[], HwaccelProbe] | None,
    cpu_budget: int,
    sessions: int,
) -> HwaccelChoice:
    """The hwaccel for ``setting``: ``none`` and ``cuda`` as the operator set them (no probe); ``auto`` is
    ``none`` without a GPU, without FFmpeg's ``cuda`` hwdevice or without a probe, else ``probe()`` decides.

    The model (an interpretation): the box decodes in software at ``cpu_budget / software.cpu_s`` videos/s
    (every CPU busy decoding), and with NVDEC at ``min(sessions / cuda.wall_s, cpu_budget / cuda.cpu_s)``
    (the NVDEC sessions, each one video at a time, or the CPU the decoders still need, whichever runs out
    first), where the NVDEC figures are those measured with ``sessions`` decoder processes at once, so the
    contention between sessions is in ``wall_s``: one video alone says nothing about sixteen (BENCHMARKS.md
    "GPU": 2x faster alone, 3.7x slower sixteen at once). NVDEC is chosen only when it beats software by
    :data:`NVDEC_MARGIN`. A probe that failed, timed out, fell back to software or measured fewer sessions
    than ``sessions`` gives ``none``, with the reason.
    """
    if setting == "none":
        return HwaccelChoice("none", "hwaccel=none: software decoding, set by the operator")
    if setting == "cuda":
        return HwaccelChoice(
            "cuda", "hwaccel=cuda: NVDEC, set by the operator (software for a video it fails on)"
        )
    if not gpu:
        return HwaccelChoice("none", "auto: no GPU, software decoding")
    if not cuda_listed:
        return HwaccelChoice("none", "auto: FFmpeg has no cuda hwdevice, software decoding")
    if probe is None:
        return HwaccelChoice("none", "auto: NVDEC not measured, software decoding")
    result = probe()

    def software(why: str) -> HwaccelChoice:
        return HwaccelChoice("none", f"auto: {why}; software decoding", result)

    if result.error is not None:
        return software(f"the probe failed ({result.error})")
    soft = result.software
    if soft is None or soft.error is not None or soft.used != "none":
        return software(f"software decoding was not measured ({soft.describe() if soft else 'no figures'})")
    nvdec = result.nvdec
    if nvdec is None or nvdec.error is not None:
        return software(f"NVDEC failed in the probe ({nvdec.error if nvdec else 'no figures'})")
    if nvdec.used != "cuda":
        return software(f"NVDEC fell back to software in the probe (decoders used {nvdec.used})")
    if nvdec.streams < sessions:
        return software(f"NVDEC measured with {nvdec.streams} sessions, not the {sessions} the worker runs")
    software_rate = _rate(cpu_budget, soft.cpu_s)
    nvdec_rate = min(_rate(sessions, nvdec.wall_s), _rate(cpu_budget, nvdec.cpu_s))
    estimate = (
        f"estimated {nvdec_rate:.2f} videos/s with NVDEC ({sessions} sessions) against "
        f"{software_rate:.2f} in software ({cpu_budget} CPUs)"
    )
    if nvdec_rate > NVDEC_MARGIN * software_rate:
        return HwaccelChoice("cuda", f"auto: NVDEC, {estimate}", result)
    return software(f"NVDEC not {NVDEC_MARGIN - 1:.0%} faster, {estimate}")


# --- the probe -----------------------------------------------------------------------------------------


def make_probe_clip(path: Path, *, seconds: float = CLIP_SECONDS) -> Path:
    """Encode the probe's clip: 720p H.264 (libx264 ``veryfast``, 25 fps, 2 s GOP, a moving texture so the
    decoder has real work) and a 440 Hz AAC tone, in MP4."""
    width, height = CLIP_SIZE
    blocks = np.random.default_rng(0).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    texture = np.kron(blocks, np.ones((8, 8, 1), np.uint8))
    with av.open(str(path), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=CLIP_FPS)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        gop = 2 * CLIP_FPS
        video.options = {"preset": "veryfast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        audio = out.add_stream("aac", rate=48000, layout="mono")
        for i in range(int(seconds * CLIP_FPS)):
            frame = av.VideoFrame.from_ndarray(np.roll(texture, 4 * i, axis=1), format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode())
        size = audio.codec_context.frame_size or 1024
        total = int(seconds * 48000)
        for start in range(0, total, size):
            t = np.arange(start, min(start + size, total)) / 48000
            tone = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 48000, start
            out.mux(audio.encode(frame))
        out.mux(audio.encode())
    return path


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` so far (``/proc/<pid>/stat``, fields 14 and 15)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _decode(pool: DecodePool, request: DecodeRequest, rounds: int) -> list[DecodeStats]:
    stats = []
    for _ in range(rounds):
        with pool.open(request) as source:
            for _chunk in source.chunks():
                pass
            stats.append(source.stats)
    return stats


def _decode_streams(pool: DecodePool, request: DecodeRequest, streams: int, rounds: int) -> list[DecodeStats]:
    with ThreadPoolExecutor(streams) as threads:
        per_stream = list(threads.map(lambda _: _decode(pool, request, rounds), range(streams)))
    return [s for stream in per_stream for s in stream]


def measure_decode(
    clip: str, hwaccel: str, *, sampling: SamplingPolicy, streams: int = 1, rounds: int = 1
) -> DecodeMeasurement:
    """Decode ``clip`` in ``streams`` fresh decoder processes at once: one warm-up video each, then
    ``rounds`` measured each (figures: see the module docstring). A failure is the record's ``error``."""
    request = DecodeRequest(uri=clip, sampling=sampling, limits=PROBE_LIMITS, hwaccel=hwaccel)
    pool = DecodePool(streams)
    try:
        _decode_streams(pool, request, streams, 1)
        pids = pool.pids()
        cpu0, t0 = _cpu_s(pids) + time.process_time(), time.perf_counter()
        stats = _decode_streams(pool, request, streams, rounds)
        elapsed = time.perf_counter() - t0
        if sorted(pool.pids()) != sorted(pids):
            raise RuntimeError("a decoder process was replaced during the measurement")
        cpu = _cpu_s(pids) + time.process_time() - cpu0
    except Exception as exc:  # noqa: BLE001 - any failure is this path's finding
        return DecodeMeasurement(hwaccel, streams=streams, error=f"{type(exc).__name__}: {exc}")
    finally:
        pool.close()
    used = {s.hwaccel for s in stats}
    n = len(stats)
    return DecodeMeasurement(
        hwaccel,
        streams=streams,
        videos=n,
        wall_s=elapsed * streams / n,
        cpu_s=cpu / n,
        frames_decoded=sum(s.frames_decoded for s in stats) / n,
        used=used.pop() if len(used) == 1 else "mixed",
    )


def probe(clip: str, *, streams: int, sampling: SamplingPolicy) -> HwaccelProbe:
    """Measure ``clip`` in software, with NVDEC alone and, when that decoded on NVDEC and ``streams`` > 1,
    with ``streams`` NVDEC sessions at once (in this process; :func:`run_probe` runs it in its own)."""
    software = measure_decode(clip, "none", sampling=sampling)
    cuda = measure_decode(clip, "cuda", sampling=sampling)
    sessions = None
    if cuda.error is None and cuda.used == "cuda" and streams > 1:
        sessions = measure_decode(clip, "cuda", sampling=sampling, streams=streams, rounds=PROBE_ROUNDS)
    return HwaccelProbe(software=software, cuda=cuda, cuda_sessions=sessions, clip=clip)


def _exit_text(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def run_probe(
    *,
    streams: int,
    sampling: SamplingPolicy | None = None,
    clip: str | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> HwaccelProbe:
    """``python -m worker.media.hwaccel`` in a subprocess (its own session: on timeout it and its decoder
    processes are killed); its failure is the record's ``error``."""
    sampling = sampling or SamplingPolicy()
    cmd = [
        sys.executable,
        "-m",
        "worker.media.hwaccel",
        "--streams",
        str(streams),
        "--fps",
        str(sampling.fps),
        "--max-frames",
        str(sampling.max_frames),
        *(["--clip", clip] if clip else []),
    ]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return HwaccelProbe(clip=clip or "", error=f"timed out after {timeout_s:g} s")
    if proc.returncode != 0:
        tail = err.strip().splitlines()[-1:] or [""]
        return HwaccelProbe(clip=clip or "", error=f"{_exit_text(proc.returncode)}: {tail[0][:300]}")
    try:
        return HwaccelProbe.from_dict(json.loads(out.strip().splitlines()[-1]))
    except (ValueError, IndexError, TypeError) as exc:
        return HwaccelProbe(clip=clip or "", error=f"unreadable output ({exc})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m worker.media.hwaccel",
        description="Measure software and NVDEC decoding of a clip; print one JSON object.",
    )
    ap.add_argument("--clip", help="a video to decode (default: a generated 720p H.264 clip)")
    ap.add_argument("--streams", type=int, default=1, help="NVDEC sessions (decoder processes) at once")
    ap.add_argument("--fps", type=float, default=1.0, help="frames sampled per second, as the worker's fps")
    ap.add_argument("--max-frames", type=int, default=300, help="as the worker's max_frames")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sampling = SamplingPolicy(fps=args.fps, max_frames=args.max_frames)
    with tempfile.TemporaryDirectory(prefix="tagstream-hwaccel-") as tmp:
        clip = args.clip or str(make_probe_clip(Path(tmp) / "probe.mp4"))
        result = probe(clip, streams=max(1, args.streams), sampling=sampling)
    if not args.clip:
        w, h = CLIP_SIZE
        result = replace(result, clip=f"generated {w}x{h} H.264 {CLIP_FPS} fps {CLIP_SECONDS:g} s")
    print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
