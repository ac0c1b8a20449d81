"""The decode side of bench_gpu.py: its clip, what runs in its decode processes (the project's sampled
decode of one video, plain PyAV decoding on the CPU or NVDEC, parallel NVDEC streams) and the pools that
run them. Module-level imports stay light: forkserver children import this module, never torch's CUDA
state."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def make_clip(cache: Path, seconds: float, gop_s: int = 2, height: int = 720) -> Path:
    """The benchmark clip, made once and cached in ``cache``: H.264 (veryfast, 2 B-frames, a keyframe every
    ``gop_s`` seconds; 720p unless ``height`` says otherwise, 16:9) + AAC mono, ``seconds`` long, a moving
    texture with mild grain."""
    import av
    import numpy as np

    fps, (w, h) = 25, (height * 16 // 9 // 16 * 16, height)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"clip_{h}p_{seconds:g}s_gop{gop_s}.mp4"
    if not path.exists():
        rng = np.random.default_rng(0)
        tex = np.kron(rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8),
                      np.ones((16, 16, 1), np.uint8))[:h, :w].astype(np.int16)
        grains = [np.clip(tex + rng.integers(-4, 5, tex.shape, dtype=np.int16), 0, 255).astype(np.uint8)
                  for _ in range(8)]
        tmp = path.with_suffix(".tmp.mp4")
        n, rate, a_pos = int(round(seconds * fps)), 44100, 0
        with av.open(str(tmp), "w") as out:
            vs = out.add_stream("libx264", rate=fps)
            vs.width, vs.height, vs.pix_fmt, vs.gop_size = w, h, "yuv420p", gop_s * fps
            vs.options = {"preset": "veryfast", "x264-params": f"keyint={gop_s * fps}:min-keyint={gop_s * fps}:"
                          "scenecut=0:bframes=2"}
            aus = out.add_stream("aac", rate=rate, layout="mono")
            for i in range(n):
                frame = av.VideoFrame.from_ndarray(np.roll(grains[i % 8], (7 * i) % w, axis=1), format="rgb24")
                frame.pts = i
                for pkt in vs.encode(frame):
                    out.mux(pkt)
                while a_pos < (i + 1) * rate / fps:  # audio interleaved with video
                    t = (a_pos + np.arange(1024)) / rate
                    s = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(1024)).astype(np.float32)
                    af = av.AudioFrame.from_ndarray(s[None, :], format="fltp", layout="mono")
                    af.sample_rate, af.pts = rate, a_pos
                    for pkt in aus.encode(af):
                        out.mux(pkt)
                    a_pos += 1024
            for st in (vs, aus):
                for pkt in st.encode():
                    out.mux(pkt)
        tmp.replace(path)
    return path


def limits():
    from worker.media.records import DecodeLimits

    return DecodeLimits(max_duration_s=1e6, max_pixels=1 << 30, max_file_bytes=1 << 40, open_timeout_s=30,
                        read_timeout_s=30, decode_budget_s=3600)


def decode_video(path: str, keep: bool = True, hwaccel: str = "none", child_patches: bool = False) -> dict:
    """The project's decode step for one video (as a pipeline decode thread does it): sampled 224x224 RGB
    frames at 1 frame/s and VGGish log-mel patches (``child_patches``: cut by the decoder in NumPy, else
    from its raw audio by torch's ``PatchStream``). ``keep=False`` drops the arrays (decode-only runs).
    ``cpu_s`` is this process's CPU time for the video."""
    import torch

    from worker.media.sampling import SamplingPolicy
    from worker.media.source import VideoSource

    torch.set_num_threads(1)
    c0 = time.process_time()
    policy = SamplingPolicy(fps=1.0, max_frames=300)
    out = decode_source(lambda: VideoSource(path, policy, limits(), hwaccel=hwaccel, audio_patches=child_patches),
                        keep)  # fmt: skip
    return dict(out, cpu_s=time.process_time() - c0)


def decode_isolated(pool, path: str, keep: bool = True, hwaccel: str = "none", child_patches: bool = False) -> dict:
    """:func:`decode_video` through one of the worker's isolated decoder processes (a
    ``worker.media.isolation.DecodePool``: lock-step chunks, raw arrays over a socketpair, nothing pickled).
    ``child_patches``: the decoder process cuts the log-mel patches (NumPy) and sends them, as the worker
    asks it to; else it sends the raw audio and the patches are cut in this thread (torch). ``cpu_s`` is
    this thread's CPU time; the decoder processes' is read from /proc by the caller."""
    from worker.media.sampling import SamplingPolicy

    c0 = time.thread_time()
    policy = SamplingPolicy(fps=1.0, max_frames=300)
    out = decode_source(lambda: pool.source(path, policy, limits(), hwaccel=hwaccel, audio_patches=child_patches),
                        keep)  # fmt: skip
    return dict(out, cpu_s=time.thread_time() - c0)


def decode_source(open_source, keep: bool) -> dict:
    """Frames and log-mel patches of the source ``open_source()`` opens (a ``VideoSource`` or an isolated
    one): patch chunks as they come, raw audio chunks cut here with torch's ``PatchStream``; ``wall_s``
    includes the open. ``keep=False``: counts only."""
    import numpy as np
    import torch

    from model.audio_frontend import PatchStream
    from worker.media.records import AudioChunk, FrameChunk

    t0 = time.perf_counter()
    frames, patches, n_frames, n_patches = [], [], 0, 0
    with torch.inference_mode(), open_source() as src:
        stream = PatchStream()
        for chunk in src.chunks():
            if isinstance(chunk, FrameChunk):
                n_frames += len(chunk.frames)
                if keep:
                    frames.append(chunk.frames)
                continue
            p = stream.push(chunk.samples).numpy() if isinstance(chunk, AudioChunk) else chunk.patches
            n_patches += len(p)
            if keep and len(p):
                patches.append(p)
        stats = src.stats
    out = {"frames_sampled": n_frames, "patches": n_patches, "frames_decoded": stats.frames_decoded,
           "strategy": stats.strategy, "hwaccel": stats.hwaccel, "wall_s": time.perf_counter() - t0}
    if keep:
        out["frames"] = np.concatenate(frames) if frames else np.zeros((0, 224, 224, 3), np.uint8)
        out["patches_arr"] = np.concatenate(patches) if patches else np.zeros((0, 96, 64), np.float32)
    return out


def decode_all(path: str, threads: int = 1, hw: str = "none", until: float | None = None) -> dict:
    """Plain PyAV: decode every frame (no conversion; stop early once ``time.perf_counter()`` passes
    ``until``). ``hw``: "none", "cuda" (frames downloaded to host) or
    "cuda-device" (frames stay on the GPU). Raises if NVDEC was asked for and is not used. NVDEC decoders use
    the device's primary CUDA context (as ``worker.media.hwaccel`` does), which FFmpeg refuses (ENOTSUP) once
    torch has activated it: call this in a process that has not initialised CUDA through torch."""
    import av

    kwargs = {}
    if hw != "none":
        from av.codec.hwaccel import HWAccel

        kwargs["hwaccel"] = HWAccel("cuda", allow_software_fallback=False, is_hw_owned=hw == "cuda-device",
                                    options={"primary_ctx": "1"})
    t0, n, fmt = time.perf_counter(), 0, None
    with av.open(path, **kwargs) as c:
        v = c.streams.video[0]
        v.codec_context.thread_count = threads
        v.thread_type = "AUTO" if threads > 1 else "SLICE"
        if hw != "none" and not v.codec_context.is_hwaccel:
            raise RuntimeError("PyAV opened the stream without the cuda hwaccel")
        for frame in c.decode(v):
            fmt = fmt or frame.format.name
            n += 1
            if until is not None and time.perf_counter() >= until:
                break
    return {"frames": n, "wall_s": time.perf_counter() - t0, "frame_format": fmt}


def decode_streams(path: str, streams: int, hw: str, max_s: float | None = None) -> dict:
    """``streams`` :func:`decode_all` at once on threads of this (pool) process: with NVDEC, that many
    decoder sessions in one shared CUDA context (the primary context, held for the process's life). With
    ``max_s`` each thread decodes the clip over and over (a new decoder each time) for ``max_s`` seconds."""
    from worker.media.hwaccel import cuda_device_options

    shared = bool(cuda_device_options()) if hw != "none" else None
    t0 = time.perf_counter()
    until = None if max_s is None else t0 + max_s

    def one(_: int) -> dict:
        r = decode_all(path, hw=hw, until=until)
        while until is not None and time.perf_counter() < until:
            r = dict(r, frames=r["frames"] + decode_all(path, hw=hw, until=until)["frames"])
        return r

    with ThreadPoolExecutor(streams) as ex:
        res = list(ex.map(one, range(streams)))
    wall = time.perf_counter() - t0
    n = sum(r["frames"] for r in res)
    return {"streams": streams, "frames": n, "wall_s": wall, "frames_per_s": n / wall,
            "frame_format": res[0]["frame_format"], "shared_context": shared}


def make_pool(n: int):
    """``n`` decode processes. Like the worker's decoder processes (``worker.media.isolation``) they get one
    BLAS/OpenMP thread each: the forkserver that starts them inherits this process's environment when it
    starts, and NumPy's log-mel (``child_patches``) costs over twice the CPU with OpenBLAS's default threads."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    ctx = mp.get_context("forkserver")  # never fork a process that holds a CUDA context
    ctx.set_forkserver_preload(["worker.media.source", "model.audio_frontend"])
    return ProcessPoolExecutor(max_workers=n, mp_context=ctx)


def kill_pool(pool) -> None:
    """Stop a pool whose section timed out: cancel queued work and kill its worker processes."""
    procs = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.kill()


class DecoderFarm:
    """``n`` decoders of one clip behind :meth:`submit` (a Future of a :func:`decode_video`-style dict).

    ``transport``: ``"decoder-processes"``: the worker's isolated decoder processes
    (``worker.media.isolation.DecodePool``, one per thread of this process, :func:`decode_isolated`), or
    ``"process-pool"``: :func:`decode_video` in a ``ProcessPoolExecutor``, the arrays pickled back.
    ``child_patches``: the decoders cut the log-mel patches (NumPy) instead of sending raw audio."""

    TRANSPORTS = ("decoder-processes", "process-pool")

    def __init__(self, n: int, transport: str, path: str, hwaccel: str, *, child_patches: bool = False) -> None:
        self.n, self.transport, self.path, self.hwaccel = n, transport, path, hwaccel
        self.child_patches = child_patches
        self._cpu0 = 0.0
        if transport == "process-pool":
            self._pool = make_pool(n)
        elif transport == "decoder-processes":
            from worker.media.isolation import DecodePool

            self._decoders = DecodePool(n, memory_limit_mb=0)
            self._pool = ThreadPoolExecutor(n, thread_name_prefix="decode")
        else:
            raise ValueError(f"transport {transport!r} not in {self.TRANSPORTS}")

    def submit(self, keep: bool):
        if self.transport == "process-pool":
            return self._pool.submit(decode_video, self.path, keep, self.hwaccel, self.child_patches)
        return self._pool.submit(decode_isolated, self._decoders, self.path, keep, self.hwaccel, self.child_patches)

    def warm(self) -> None:
        """One video on every decoder (process start, imports, CUDA context), then mark the CPU clock."""
        for f in [self.submit(False) for _ in range(self.n)]:
            f.result()
        self._cpu0 = self._children_cpu_s()

    def decode_cpu_s(self, results: list[dict]) -> float:
        """Decoder CPU seconds since :meth:`warm` (``results``: the dicts of the videos decoded since)."""
        if self.transport == "process-pool":
            return sum(r["cpu_s"] for r in results)
        return self._children_cpu_s() - self._cpu0

    def _children_cpu_s(self) -> float:
        if self.transport != "decoder-processes":
            return 0.0
        from bench_worker import proc_cpu_s

        return sum(proc_cpu_s(pid) for pid in self._decoders.pids())

    def close(self) -> None:
        if self.transport == "process-pool":
            kill_pool(self._pool)
        else:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._decoders.close()
