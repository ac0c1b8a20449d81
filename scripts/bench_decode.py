"""Decoder benchmarks (BENCHMARKS.md "## Decoder"); prints a Markdown table to stdout.

1. Sampling 1 frame/s with VideoSource vs decoding every frame with plain PyAV, side by side on the same
   files: 1 s GOP and 10 s GOP H.264 content (frames decoded and wall time, best of 3 runs).
2. Peak RSS of decoding a 90-minute vs a 1-minute video, each in its own subprocess (ru_maxrss).

    python scripts/bench_decode.py            # full: 60 s 640x360 clips, 90-minute RSS run
    python scripts/bench_decode.py --quick    # 20 s clips, 10-minute "long" video
Generated media is cached under --cache (default /tmp/tagstream-bench).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def decode_everything(path: Path, threads: int = 1) -> tuple[int, float]:
    """Plain PyAV: decode every frame (no conversion). threads=1 matches one decoder per thread."""
    import av

    t0 = time.perf_counter()
    n = 0
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        v.thread_type = "AUTO" if threads > 1 else "SLICE"
        v.codec_context.thread_count = threads
        for _ in c.decode(v):
            n += 1
    return n, time.perf_counter() - t0


def decode_sampled(path: Path, fps: float = 1.0) -> tuple[int, float, str, int]:
    from worker.decode import DecodeLimits, FrameChunk, SamplingPolicy, VideoSource

    limits = DecodeLimits(max_duration_s=1e6, max_pixels=1 << 30, max_file_bytes=1 << 40, open_timeout_s=10,
                          read_timeout_s=10, decode_budget_s=3600)
    t0 = time.perf_counter()
    sampled = 0
    with VideoSource(str(path), SamplingPolicy(fps=fps, max_frames=100000), limits, decode_audio=False) as src:
        for chunk in src.chunks():
            if isinstance(chunk, FrameChunk):
                sampled += len(chunk.timestamps)
        return src.stats.frames_decoded, time.perf_counter() - t0, src.stats.strategy, sampled


def best_of(fn, runs=3):
    results = [fn() for _ in range(runs)]
    return min(results, key=lambda r: r[1])


def peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would carry the parent's high-water mark across fork+exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(path: str) -> None:
    from worker.decode import AudioChunk, DecodeLimits, SamplingPolicy, VideoSource

    limits = DecodeLimits(max_duration_s=1e6, max_pixels=1 << 30, max_file_bytes=1 << 40, open_timeout_s=10,
                          read_timeout_s=10, decode_budget_s=3600)
    t0 = time.perf_counter()
    frames = audio = 0
    with VideoSource(path, SamplingPolicy(), limits) as src:
        for chunk in src.chunks():
            if isinstance(chunk, AudioChunk):
                audio += chunk.samples.size
            else:
                frames += len(chunk.timestamps)
        strategy, decoded = src.stats.strategy, src.stats.frames_decoded
    print(json.dumps({"peak_rss_mb": peak_rss_mb(),
                      "frames_sampled": frames, "frames_decoded": decoded, "strategy": strategy,
                      "audio_s": audio / 16000, "wall_s": time.perf_counter() - t0}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cache", default="/tmp/tagstream-bench")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return 0
    from media import make_video

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    secs = 20 if args.quick else 60
    size = (640, 360)
    print(f"## Sampling 1 frame/s vs decoding every frame (H.264, 25 fps, {size[0]}x{size[1]}, {secs} s, best of 3)\n")
    print("| content | strategy | frames decoded (all / sampled) | ratio | time all 1 thread / sampled (s) "
          "| speed-up | time all, 2 frame threads (s) |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for gop_s in (1, 10):
        path = cache / f"gop{gop_s}_{secs}s_{size[0]}x{size[1]}_natural.mp4"
        if not path.exists():
            make_video(path, seconds=secs, fps=25, size=size, gop=25 * gop_s, pattern="natural",
                       options={"preset": "veryfast"}, bframes=2)
        n_all, t_all = best_of(lambda p=path: decode_everything(p))
        _, t_all2 = best_of(lambda p=path: decode_everything(p, threads=2))
        n_s, t_s, strategy, _ = best_of(lambda p=path: decode_sampled(p))
        print(f"| {gop_s} s GOP | {strategy} | {n_all} / {n_s} | {n_all / n_s:.1f}x | {t_all:.3f} / {t_s:.3f} "
              f"| {t_all / t_s:.2f}x | {t_all2:.3f} |")
        ok &= (n_all / n_s >= 5 and t_all / t_s >= 3) if gop_s == 1 else t_s <= t_all * 1.05
    print()
    long_min = 10 if args.quick else 90
    rows = []
    for minutes in (1, long_min):
        path = cache / f"rss_{minutes}min.mp4"
        if not path.exists():
            t0 = time.perf_counter()
            make_video(path, seconds=minutes * 60, fps=10, size=(320, 180), gop=250, audio="aac",
                       audio_rate=16000, audio_layout="mono", pattern="busy")
            print(f"(generated {path.name} in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(path)], capture_output=True,
                             text=True, check=True)
        rows.append((minutes, path.stat().st_size, json.loads(out.stdout.strip().splitlines()[-1])))
    print("## Peak RSS, whole decode (frames + audio) in a fresh subprocess (320x180, 10 fps, 25 s GOP, AAC)\n")
    print("| video | file MB | strategy | frames sampled / decoded | audio s | wall s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for minutes, size_b, r in rows:
        print(f"| {minutes} min | {size_b / 1e6:.1f} | {r['strategy']} | {r['frames_sampled']} / {r['frames_decoded']} "
              f"| {r['audio_s']:.0f} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.1f} |")
    diff = rows[1][2]["peak_rss_mb"] - rows[0][2]["peak_rss_mb"]
    print(f"\npeak RSS difference {long_min} min - 1 min: {diff:.1f} MB (target <= 150 MB)")
    ok &= diff <= 150
    print(f"\nall targets met: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
