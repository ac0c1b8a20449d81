"""Peak RSS of the whole tagging path against video length (issue 6; BENCHMARKS.md "## Pipeline").

Each video goes through the worker's :class:`worker.engine.pipeline.Pipeline` (decode, all three extractors,
fusion when a checkpoint exists) in a fresh subprocess, alone. Reported: the worker process's VmHWM and
the decoder child's VmHWM (decode isolation) after the video, the frames sampled and audio patches, and
the difference between the longest and the 1-minute video (target: <= 150 MB for 90 minutes against 1).

Videos are 320x180, 10 fps, 25 s keyframe interval, H.264 + AAC mono, generated with ``tests/media.py``
(``pattern="busy"``) and cached in ``--cache``; a 90-minute one takes a few minutes to make once.

    python scripts/bench_memory.py                 # 1 and 90 minutes
    python scripts/bench_memory.py --minutes 1,10  # quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_clips import default_cache  # noqa: E402
from bench_worker import bench_settings, hwm_mb, load_warm_models, peak_rss_mb  # noqa: E402


def long_video(cache: Path, minutes: int) -> Path:
    from media import make_video

    path = cache / f"memory_{minutes}min_320x180.mp4"
    if not path.is_file():
        part = path.with_suffix(".part.mp4")
        make_video(part, seconds=60.0 * minutes, fps=10, size=(320, 180), gop=250, audio="aac",
                   audio_layout="mono", audio_rate=16000, pattern="busy")
        part.replace(path)
    return path


def child(path: Path) -> dict:
    from worker.engine.pipeline import Pipeline
    from worker.engine.request import VideoRequest

    settings = bench_settings(allowed_roots=[str(path.parent)], decode_threads=1, max_duration_s=4 * 3600.0,
                              decode_budget_s=3600.0)
    models = load_warm_models(settings)
    before = peak_rss_mb()
    t0 = time.time()
    with Pipeline(settings, models) as pipeline:
        doc = pipeline.submit(VideoRequest(video_id=path.stem, uri=str(path), title="a long video")).result()
        pool = getattr(pipeline, "_decode_pool", None)
        decoder = max((hwm_mb(pid) for pid in pool.pids()), default=0.0) if pool is not None else 0.0
    return {"video": path.name, "wall_s": time.time() - t0, "rss_after_load_mb": before, "peak_rss_mb": peak_rss_mb(),
            "decoder_peak_rss_mb": decoder, "frames": doc["media"]["frames"], "audio_s": doc["media"]["audio_s"],
            "duration_s": doc["media"]["duration_s"], "features": doc.get("features")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", default="1,90", help="video lengths in minutes (default 1,90)")
    p.add_argument("--cache", type=Path, default=default_cache().parent)
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    args.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for minutes in (int(m) for m in args.minutes.split(",")):
        path = long_video(args.cache, minutes)
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(path)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-4000:])
        rows.append({"minutes": minutes, **json.loads(proc.stdout.strip().splitlines()[-1])})
    print("| video | frames sampled | audio s | wall s | worker RSS after model load MB | worker peak RSS MB | "
          "decoder child peak RSS MB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['minutes']} min | {r['frames']} | {r['audio_s']:.0f} | {r['wall_s']:.1f} | "
              f"{r['rss_after_load_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['decoder_peak_rss_mb']:.0f} |")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        total = (last["peak_rss_mb"] + last["decoder_peak_rss_mb"]) - (first["peak_rss_mb"] + first["decoder_peak_rss_mb"])
        print(f"\npeak RSS (worker + decoder) {last['minutes']} min - {first['minutes']} min: {total:.1f} MB "
              f"(target <= 150 MB: {'met' if total <= 150 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
