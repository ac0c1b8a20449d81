"""Decode-only measurements of bench_feed.py: the worker's isolated decoder processes
(``worker.media.isolation.DecodePool``) in software or with NVDEC (frames downloaded to the host), and
plain PyAV NVDEC sessions that keep their frames on the GPU (``bench_gpu_decode.decode_streams`` in a fresh
process). Imports no torch: the calling process must never hold a CUDA context of its own.

Interpretations:

- :func:`pool_rate`: ``decoders`` threads, each decoding the clip over and over through its own decoder
  process, with the request the engine's decode threads make (1 frame/s, 224 crops, log-mel patches cut in
  the decoder process). The window starts once every thread has finished its first video (process start,
  imports, the CUDA context) and lasts ``measure_s``. Videos/s counts the frames received in the window,
  each as 1/(frames per video) of a video, so a video cut by either end of the window counts for the part
  inside it. Decoder CPU per video is the decoder processes' CPU over the window (``/proc``) per video.
- :func:`kept_rate`: frames/s of all-frame decoding with frames left on the GPU (``is_hw_owned``), sessions
  as threads of one new process that shares the primary CUDA context; the error text when refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_feed_monitor import Nvml, Sampler, Utilisation, proc_cpu_s

HERE = Path(__file__).resolve().parent


@dataclass
class DecodeResult:
    """One decode-only measurement. ``error``: why there is no figure (then ``videos_per_s`` is None)."""

    videos_per_s: float | None = None
    frames_per_s: float | None = None
    decoder_cpu_s_per_video: float | None = None
    frames_decoded_per_video: float | None = None
    videos_done: int = 0
    used: dict[str, int] = field(default_factory=dict)  # DecodeStats.hwaccel -> videos
    failures: int = 0
    error: str | None = None
    util: Utilisation | None = None


def _request(clip: str, hwaccel: str):
    from bench_gpu_decode import limits

    from worker.media.records import DecodeRequest
    from worker.media.sampling import SamplingPolicy

    return DecodeRequest(clip, SamplingPolicy(fps=1.0, max_frames=300), limits(), hwaccel=hwaccel,
                         audio_patches=True)


def pool_rate(clip: str, decoders: int, hwaccel: str, measure_s: float, warm_timeout_s: float,
              nvml: Nvml) -> DecodeResult:
    """See the module docstring. ``hwaccel``: "none" or "cuda" (never "auto": no probe here)."""
    from worker.media.isolation import DecodePool
    from worker.media.records import FrameChunk

    request = _request(clip, hwaccel)
    pool = DecodePool(decoders, memory_limit_mb=0)
    lock = threading.Lock()
    arrivals: list[tuple[float, int, int]] = []  # (monotonic, frames, video number)
    per_video: dict[int, int] = {}  # video number -> frames sampled (finished videos)
    stats: list = []
    errors: list[str] = []
    warmed = threading.Barrier(decoders + 1)
    window: list[tuple[float, float]] = []  # [(start, end)] once the window is set
    counter = iter(range(1 << 30))

    def loop() -> None:
        first = True
        while not window or time.monotonic() < window[0][1]:
            with lock:
                vid = next(counter)
            try:
                with pool.open(request) as src:
                    for chunk in src.chunks():
                        if isinstance(chunk, FrameChunk):
                            with lock:
                                arrivals.append((time.monotonic(), len(chunk.frames), vid))
                        if window and time.monotonic() >= window[0][1]:
                            break
                    else:
                        with lock:
                            per_video[vid] = src.stats.frames_sampled
                            stats.append(src.stats)
            except Exception as exc:  # noqa: BLE001 - a failed video is counted and reported
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
            if first:
                first = False
                try:
                    warmed.wait(warm_timeout_s)
                except threading.BrokenBarrierError:
                    pass
            if len(errors) > 2 * decoders and not per_video:
                return

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(decoders)]
    for t in threads:
        t.start()
    sampler = Sampler(nvml)
    try:
        try:
            warmed.wait(warm_timeout_s)
        except threading.BrokenBarrierError:
            pass
        cpu0 = sum(proc_cpu_s(p) for p in pool.pids())
        sampler.start()
        w0 = time.monotonic()
        window.append((w0, w0 + measure_s))
        for t in threads:
            t.join(measure_s + warm_timeout_s)
        util = sampler.stop()
        cpu1 = sum(proc_cpu_s(p) for p in pool.pids())
    finally:
        pool.close()
    with lock:
        done = list(stats)
        per = sorted(per_video.values())
    if not per:
        return DecodeResult(error=errors[0] if errors else "no video finished", failures=len(errors), util=util)
    frames_per_video = per[len(per) // 2]
    in_window = sum(n for t, n, _ in arrivals if w0 <= t < w0 + measure_s)
    videos = in_window / max(1, frames_per_video) / measure_s
    used: dict[str, int] = {}
    for s in done:
        used[s.hwaccel] = used.get(s.hwaccel, 0) + 1
    return DecodeResult(
        videos_per_s=videos, frames_per_s=in_window / measure_s,
        decoder_cpu_s_per_video=(cpu1 - cpu0) / max(1e-9, videos * measure_s),
        frames_decoded_per_video=sum(s.frames_decoded for s in done) / len(done), videos_done=len(done),
        used=used, failures=len(errors), error=None, util=util,
    )  # fmt: skip


def kept_rate(clip: str, sessions: int, max_s: float, nvml: Nvml) -> DecodeResult:
    """See the module docstring: a new process runs ``decode_streams(clip, sessions, "cuda-device")``."""
    code = ("import json, sys; from bench_gpu_decode import decode_streams; "
            f"print(json.dumps(decode_streams({clip!r}, {sessions}, 'cuda-device', {max_s!r})))")
    sampler = Sampler(nvml)
    sampler.start()
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=max_s + 40,
                              cwd=HERE)
    except subprocess.TimeoutExpired:
        return DecodeResult(error=f"timed out after {max_s + 40:g} s", util=sampler.stop())
    util = sampler.stop()
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return DecodeResult(error=lines[-1] if lines else f"exit status {proc.returncode}", util=util)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return DecodeResult(frames_per_s=out["frames_per_s"], used={"cuda-device": out["streams"]}, util=util)


def nvdec_refusal(clip: str) -> str | None:
    """Why NVDEC cannot decode ``clip`` here (None: it can): a short decode with software fallback off, in
    a new process."""
    code = ("import time; from bench_gpu_decode import decode_all; "
            f"decode_all({clip!r}, hw='cuda', until=time.perf_counter() + 0.5)")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=HERE)
    except subprocess.TimeoutExpired:
        return "an NVDEC test decode did not finish in 60 s"
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit status {proc.returncode}"
