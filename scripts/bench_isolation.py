"""The cost of decoder isolation (``decode_isolation``): the same work with and without it, side by side.

``decode``    N clips decoded end to end (frames + audio) by T threads: ``VideoSource`` in the thread vs
              :class:`worker.media.isolation.IsolatedSource` through a pool of T decoder processes. Rounds
              alternate (in, iso, in, iso, ...); reported: best and median videos/s of each mode, the
              ratio, and CPU seconds per video (this process + the decoder processes, from /proc).
``pipeline``  The whole :class:`worker.engine.pipeline.Pipeline` (decode threads, extractors on CPU, fusion) with
              ``decode_isolation`` off vs on, same clips, alternating rounds; models loaded once before.

Clips: generated H.264/AAC (``--size``, ``--seconds``, 25 fps, 1 s GOP), cached in the temp dir. Sampling
at ``--fps`` (1.0 default; 5.0 moves five times the frames through the socket).

    python scripts/bench_isolation.py                          # both sections, defaults
    python scripts/bench_isolation.py --sections decode --fps 5 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_worker import cpu_s, proc_cpu_s  # noqa: E402


def make_clips(n: int, seconds: float, size: tuple[int, int]) -> list[Path]:
    from media import make_video

    d = Path(tempfile.gettempdir()) / f"tagstream-bench-isolation-{size[0]}x{size[1]}-{seconds:g}s"
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = d / f"clip{i:02d}.mp4"
        if not p.exists():
            tmp = p.with_suffix(".tmp.mp4")
            make_video(tmp, seconds=seconds, fps=25, size=size, gop=25, audio="aac", pattern="busy")
            tmp.rename(p)
        out.append(p)
    return out


def decode_round(clips: list[Path], threads: int, pool, fps: float) -> tuple[float, float, int]:
    """(wall s, cpu s, frames) of decoding every clip with ``threads`` threads (``pool``: isolated)."""
    from worker.config import Settings
    from worker.media.records import DecodeLimits, FrameChunk
    from worker.media.sampling import SamplingPolicy
    from worker.media.source import VideoSource

    limits = DecodeLimits.from_settings(Settings(hwaccel="none"))
    policy = SamplingPolicy(fps=fps, max_frames=300)
    frames = 0
    lock = threading.Lock()

    def one(path: Path) -> None:
        nonlocal frames
        src = pool.source(str(path), policy, limits) if pool else VideoSource(str(path), policy, limits)
        with src:
            n = sum(len(c.frames) for c in src.chunks() if isinstance(c, FrameChunk))
        with lock:
            frames += n

    kids = pool.pids() if pool else []

    def kids_cpu() -> float:
        return sum(proc_cpu_s(pid) for pid in kids)

    c0, k0, t0 = cpu_s(), kids_cpu(), time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, clips))
    wall = time.perf_counter() - t0
    return wall, cpu_s() - c0 + kids_cpu() - k0, frames


def bench_decode(args: argparse.Namespace, clips: list[Path]) -> None:
    from worker.media.isolation import DecodePool

    pool = DecodePool(args.threads)
    results: dict[str, list[tuple[float, float, int]]] = {"in-process": [], "isolated": []}
    try:
        decode_round(clips[:2], args.threads, None, args.fps)  # warm up both paths
        decode_round(clips[:2], args.threads, pool, args.fps)
        for _ in range(args.rounds):
            results["in-process"].append(decode_round(clips, args.threads, None, args.fps))
            results["isolated"].append(decode_round(clips, args.threads, pool, args.fps))
    finally:
        pool.close()
    n = len(clips)
    print(f"\n### Decode only: {n} clips, {args.threads} threads, sampling {args.fps} frame/s, "
          f"{args.rounds} alternating rounds\n")
    print("| mode | videos/s (best) | videos/s (median) | CPU s / video (median) | frames / round |")
    print("|---|---:|---:|---:|---:|")
    best = {}
    for mode, rs in results.items():
        vps = [n / w for w, _, _ in rs]
        best[mode] = max(vps)
        cpu = statistics.median(c / n for _, c, _ in rs)
        print(f"| {mode} | {max(vps):.2f} | {statistics.median(vps):.2f} | {cpu:.3f} | {rs[0][2]} |")
    med = {m: statistics.median(n / w for w, _, _ in rs) for m, rs in results.items()}
    print(f"\nisolated / in-process throughput: best {best['isolated'] / best['in-process']:.3f}, "
          f"median {med['isolated'] / med['in-process']:.3f}")


def bench_pipeline(args: argparse.Namespace, clips: list[Path]) -> None:
    from worker.config import Settings
    from worker.engine.models import load_models
    from worker.engine.pipeline import Pipeline
    from worker.engine.request import VideoRequest

    base = Settings(device="cpu", hwaccel="none", decode_threads=args.threads, fps=args.fps)
    models = load_models(base)
    results: dict[bool, list[float]] = {False: [], True: []}

    def one_round(isolated: bool) -> float:
        settings = base.model_copy(update={"decode_isolation": isolated})
        with Pipeline(settings, models) as pipe:
            time.sleep(0.5 if isolated else 0.0)  # let the decoder processes finish starting (excluded)
            t0 = time.perf_counter()
            futures = [pipe.submit(VideoRequest(f"v{i}", str(p), title="a short video")) for i, p in enumerate(clips)]
            for f in futures:
                f.result(timeout=600)
            return time.perf_counter() - t0

    one_round(False)
    for _ in range(args.rounds):
        for isolated in (False, True):
            results[isolated].append(one_round(isolated))
    n = len(clips)
    print(f"\n### Whole pipeline (CPU extractors + fusion): {n} clips, {args.threads} decode threads, "
          f"{args.rounds} alternating rounds\n")
    print("| decode_isolation | videos/s (best) | videos/s (median) |\n|---|---:|---:|")
    for isolated, ws in results.items():
        print(f"| {'on' if isolated else 'off'} | {n / min(ws):.2f} | {n / statistics.median(ws):.2f} |")
    ratio = min(results[False]) / min(results[True])
    print(f"\non / off throughput (best): {ratio:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="decode,pipeline")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--size", default="480x270")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    clips = make_clips(args.clips, args.seconds, (w, h))
    print(f"## Decoder isolation cost ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start)")
    sections = args.sections.split(",")
    if "decode" in sections:
        bench_decode(args, clips)
    if "pipeline" in sections:
        bench_pipeline(args, clips)
    return 0


if __name__ == "__main__":
    sys.exit(main())
