"""What bench_gpu.py runs in its decode processes: the project's sampled decode of one video, plain PyAV
decoding (CPU or NVDEC), parallel NVDEC streams, and the process pool that runs them. Module-level imports
stay light: forkserver children import this module, never torch's CUDA state."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor


def limits():
    from worker.decode import DecodeLimits

    return DecodeLimits(max_duration_s=1e6, max_pixels=1 << 30, max_file_bytes=1 << 40, open_timeout_s=30,
                        read_timeout_s=30, decode_budget_s=3600)


def decode_video(path: str, keep: bool = True, hwaccel: str = "none") -> dict:
    """The project's decode step for one video (as a pipeline decode thread does it): sampled 224x224 RGB
    frames at 1 frame/s and VGGish log-mel patches. ``keep=False`` drops the arrays (decode-only runs)."""
    import numpy as np
    import torch

    from model.audio_frontend import PatchStream
    from worker.decode import FrameChunk, SamplingPolicy, VideoSource

    torch.set_num_threads(1)
    c0, t0 = time.process_time(), time.perf_counter()
    frames, patches, n_frames, n_patches = [], [], 0, 0
    with torch.inference_mode(), VideoSource(path, SamplingPolicy(fps=1.0, max_frames=300), limits(),
                                             hwaccel=hwaccel) as src:
        stream = PatchStream()
        for chunk in src.chunks():
            if isinstance(chunk, FrameChunk):
                n_frames += len(chunk.frames)
                if keep:
                    frames.append(chunk.frames)
            else:
                p = stream.push(chunk.samples)
                n_patches += len(p)
                if keep and len(p):
                    patches.append(p.numpy())
        stats = src.stats
    out = {"frames_sampled": n_frames, "patches": n_patches, "frames_decoded": stats.frames_decoded,
           "strategy": stats.strategy, "hwaccel": stats.hwaccel, "wall_s": time.perf_counter() - t0,
           "cpu_s": time.process_time() - c0}
    if keep:
        out["frames"] = np.concatenate(frames) if frames else np.zeros((0, 224, 224, 3), np.uint8)
        out["patches_arr"] = np.concatenate(patches) if patches else np.zeros((0, 96, 64), np.float32)
    return out


def decode_all(path: str, threads: int = 1, hw: str = "none") -> dict:
    """Plain PyAV: decode every frame (no conversion). ``hw``: "none", "cuda" (frames downloaded to host) or
    "cuda-device" (frames stay on the GPU). Raises if NVDEC was asked for and is not used. NVDEC decoders use
    the device's primary CUDA context (as ``worker.media_open`` does), which FFmpeg refuses (ENOTSUP) once
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
    return {"frames": n, "wall_s": time.perf_counter() - t0, "frame_format": fmt}


def decode_streams(path: str, streams: int, hw: str) -> dict:
    """``streams`` :func:`decode_all` at once on threads of this (pool) process: with NVDEC, that many
    decoder sessions in one shared CUDA context (the primary context, held for the process's life)."""
    from worker.media_open import cuda_device_options

    shared = bool(cuda_device_options()) if hw != "none" else None
    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as ex:
        res = list(ex.map(lambda _: decode_all(path, hw=hw), range(streams)))
    wall = time.perf_counter() - t0
    n = sum(r["frames"] for r in res)
    return {"streams": streams, "frames": n, "wall_s": wall, "frames_per_s": n / wall,
            "frame_format": res[0]["frame_format"], "shared_context": shared}


def make_pool(n: int):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("forkserver")  # never fork a process that holds a CUDA context
    ctx.set_forkserver_preload(["worker.decode", "model.audio_frontend"])
    return ProcessPoolExecutor(max_workers=n, mp_context=ctx)


def kill_pool(pool) -> None:
    """Stop a pool whose section timed out: cancel queued work and kill its worker processes."""
    procs = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.kill()
