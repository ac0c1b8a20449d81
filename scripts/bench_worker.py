"""Worker throughput against a naive baseline (issue 4's bar; BENCHMARKS.md "## Worker").

Both run the same clips (``bench_clips.py``: 20 generated 720p H.264/AAC clips) with the same extractors
and, when a fusion checkpoint is found (``model/assets/tagstream-small`` or ``TAGSTREAM_CHECKPOINT``), the
same fusion model; otherwise both run features-only. Each mode runs in its own subprocess (so peak RSS,
VmHWM, is its own), one after the other, in one invocation; models are loaded and warmed up before the
clock starts. All videos are enqueued at t=0, so end-to-end latency = result time - t=0.

* ``worker``: the real thing: a private redis-server (``worker.local_redis``), jobs enqueued with
  ``worker.client.enqueue_video``, :class:`worker.rq_worker.TagWorker` with K jobs in flight over the
  :class:`worker.pipeline.Pipeline` (decode threads, cross-video batches), burst mode. Latency = rq's
  ``ended_at - enqueued_at``; mean batch sizes from the ``tagstream_batch_size`` histogram.
* ``naive``: one video at a time: PyAV decodes *every* frame (default PyAV threading), the frame nearest
  each sampling target is converted (same resize 256 + centre crop 224), audio is decoded to 16 kHz mono
  and cut into VGGish patches; then frames go through the image extractor one by one, patches through the
  audio extractor one by one, the title through the text encoder, then fusion for that one video.

    python scripts/bench_worker.py                 # K=8, 20 clips, prints a Markdown table
    python scripts/bench_worker.py --clips 6 --k 4 # quicker
``--torch-threads`` (default: torch's own default, the CPU count) applies to both modes alike.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_clips import Clip, default_cache, make_clips  # noqa: E402

log = logging.getLogger("bench_worker")


# --- helpers shared with bench_pipeline.py and loadtest.py ------------------------------------------------
def peak_rss_mb() -> float:
    """VmHWM of this process in MB (ru_maxrss would carry a parent's high-water mark across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def cpu_s() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def bench_settings(**overrides):
    """Settings for a benchmark worker on CPU (no metrics port; torch threads from the caller)."""
    from worker.config import Settings

    base = {"device": "cpu", "metrics_port": 0, "queue": "bench", "job_retries": 0, "heartbeat_interval_s": 1.0}
    return Settings(**{**base, **overrides})


def load_warm_models(settings):
    """Load the models the way the worker does and run each once (first calls allocate and plan)."""
    import numpy as np
    import torch

    from worker.models import load_models

    models = load_models(settings)
    ex = models.extractors
    with torch.inference_mode():
        ex.image(torch.zeros((2, 224, 224, 3), dtype=torch.uint8))
        ex.audio(torch.zeros((2, 96, 64)))
        ex.text(["warm up"])
        if models.tagger is not None:
            from model.features import VideoFeatures

            f = VideoFeatures("warm", np.zeros((2, ex.image.feature_dim), np.float32), np.array([0.5, 1.5]),
                              np.zeros((2, ex.audio.feature_dim), np.float32), np.zeros((1, ex.text.feature_dim),
                                                                                        np.float32), "warm up", 2.0)
            models.tagger.predict([f])
    return models


def batch_means(metrics) -> dict[str, float]:
    """Mean items per batch for each extractor, from the ``tagstream_batch_size`` histogram."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in metrics.registry.collect():
        if family.name != "tagstream_batch_size":
            continue
        for s in family.samples:
            label = s.labels.get("extractor")
            if s.name.endswith("_sum"):
                sums[label] = s.value
            elif s.name.endswith("_count"):
                counts[label] = s.value
    return {k: (sums[k] / counts[k] if counts.get(k) else 0.0) for k in sums}


def run_worker_batch(clips: list[Clip], settings, models, metrics) -> dict:
    """Enqueue ``clips`` at once into ``settings.redis_url`` and run a TagWorker in burst mode until done."""
    import redis
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from worker.client import enqueue_video
    from worker.keys import job_id_for, result_key
    from worker.pipeline import Pipeline
    from worker.rq_worker import TagWorker

    conn = redis.Redis.from_url(settings.redis_url)
    pipeline = Pipeline(settings, models, metrics)
    pipeline.start()
    try:
        c0, t0 = cpu_s(), time.time()
        for clip in clips:
            enqueue_video(conn, clip.video_id, str(clip.path), clip.title, settings)
        TagWorker(settings, conn, pipeline, model_version=str(models.model_version), metrics=metrics).work(burst=True)
        wall_end, cpu = time.time(), cpu_s() - c0
    finally:
        pipeline.stop(timeout=10)
    latencies, statuses, frames_decoded, frames = [], {}, 0, 0
    last = t0
    for clip in clips:
        job = Job.fetch(job_id_for(clip.video_id), connection=conn, serializer=JSONSerializer)
        status = job.get_status().value
        statuses[clip.video_id] = status if status == "finished" else f"{status}: {(job.meta or {}).get('reason')}"
        doc = json.loads(conn.get(result_key(clip.video_id)) or "{}")
        if job.ended_at is not None:
            end = job.ended_at.timestamp()
            latencies.append(end - t0)
            last = max(last, end)
        frames += int((doc.get("media") or {}).get("frames") or 0)
        frames_decoded += int((doc.get("decode") or {}).get("frames_decoded") or 0)
    return {"t0": t0, "wall_s": last - t0, "burst_return_s": wall_end - t0, "cpu_s": cpu, "latencies_s": latencies,
            "statuses": statuses, "frames_sampled": frames, "frames_decoded": frames_decoded,
            "batch_means": batch_means(metrics)}


# --- child modes ------------------------------------------------------------------------------------------
def child_worker(clips: list[Clip], args: argparse.Namespace) -> dict:
    from worker.local_redis import LocalRedis
    from worker.metrics import Metrics

    with LocalRedis() as server:
        settings = bench_settings(redis_url=server.url, concurrency=args.k, decode_threads=args.decode_threads,
                                  allowed_roots=[str(clips[0].path.parent)])
        models = load_warm_models(settings)
        out = run_worker_batch(clips, settings, models, Metrics())
    out.update(model_version=str(models.model_version), k=args.k,
               decode_threads=settings.resolved_decode_threads())
    return out


def _naive_video(clip: Clip, models, settings) -> tuple[int, int]:
    """One video the naive way; returns (frames decoded, frames sampled)."""
    import av
    import numpy as np
    import torch

    from model.audio_frontend import waveform_to_patches
    from model.features import VideoFeatures
    from worker.decode import AUDIO_RATE
    from worker.sampling import SamplingPolicy

    ex = models.extractors
    size, short = int(ex.image.input_size), int(ex.image.resize_short)
    with av.open(str(clip.path)) as c:
        v = c.streams.video[0]
        duration = float(v.duration * v.time_base) if v.duration else float(c.duration / av.time_base)
        targets = SamplingPolicy(fps=settings.fps, max_frames=settings.max_frames).target_times(duration)
        start = float(v.start_time * v.time_base) if v.start_time is not None else 0.0
        decoded, j, prev, chosen = 0, 0, None, []
        for frame in c.decode(v):  # every frame, then sampled: the nearest frame to each target
            decoded += 1
            t = float(frame.pts * v.time_base) - start
            while j < len(targets) and t >= targets[j]:
                pick = prev if prev is not None and abs(targets[j] - prev[0]) <= abs(t - targets[j]) else (t, frame)
                chosen.append(pick)
                j += 1
            prev = (t, frame)
        while prev is not None and j < len(targets):
            chosen.append(prev)
            j += 1
    images, times = [], []
    for t, frame in chosen:
        scale = short / min(frame.width, frame.height)
        w, h = max(size, round(frame.width * scale)), max(size, round(frame.height * scale))
        rgb = frame.reformat(w, h, "rgb24").to_ndarray()
        y0, x0 = (h - size) // 2, (w - size) // 2
        images.append(np.ascontiguousarray(rgb[y0 : y0 + size, x0 : x0 + size]))
        times.append(t)
    with av.open(str(clip.path)) as c:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
        pcm = [o.to_ndarray().reshape(-1) for f in c.decode(audio=0) for o in resampler.resample(f)]
        pcm += [o.to_ndarray().reshape(-1) for o in resampler.resample(None)]
    patches = waveform_to_patches(np.concatenate(pcm)) if pcm else torch.zeros((0, 96, 64))
    with torch.inference_mode():
        image = [ex.image(torch.from_numpy(img[None]))[0].numpy() for img in images]
        audio = [ex.audio(patches[i : i + 1]).numpy() for i in range(len(patches))]
        states, mask = ex.text([clip.title])
        text = states[0][mask[0].bool()].float().numpy()
        feats = VideoFeatures(clip.video_id, np.concatenate(image), np.array(times), np.concatenate(audio), text,
                              clip.title, duration_s=duration)
        if models.tagger is not None:
            models.tagger.predict([feats])
    return decoded, len(images)


def child_naive(clips: list[Clip], args: argparse.Namespace) -> dict:
    settings = bench_settings()
    models = load_warm_models(settings)
    c0, t0 = cpu_s(), time.time()
    latencies, decoded, sampled = [], 0, 0
    for clip in clips:
        d, s = _naive_video(clip, models, settings)
        decoded, sampled = decoded + d, sampled + s
        latencies.append(time.time() - t0)
    return {"t0": t0, "wall_s": latencies[-1], "cpu_s": cpu_s() - c0, "latencies_s": latencies, "frames_decoded": decoded,
            "frames_sampled": sampled, "model_version": str(models.model_version),
            "batch_means": {"image": 1.0, "audio": 1.0, "text": 1.0, "fusion": 1.0}}


def run_child(mode: str, args: argparse.Namespace, extra: list[str] | None = None) -> dict:
    """Run ``mode`` of this script (or ``script``) in a fresh interpreter and return its JSON report."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--clips", str(args.clips),
           "--cache", str(args.cache), "--k", str(args.k), "--decode-threads", str(args.decode_threads),
           "--torch-threads", str(args.torch_threads), *(extra or [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(name: str, r: dict, video_s: float, n: int) -> dict:
    lat = r["latencies_s"]
    return {"mode": name, "videos_per_min": 60.0 * n / r["wall_s"], "video_s_per_s": video_s / r["wall_s"],
            "wall_s": r["wall_s"], "cpu_s_per_video": r["cpu_s"] / n, "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95),
            "peak_rss_mb": r["peak_rss_mb"], "batch_means": r["batch_means"],
            "frames_decoded": r["frames_decoded"], "frames_sampled": r["frames_sampled"]}


def table(rows: list[dict]) -> str:
    head = ("| mode | videos/min | video-s/s | wall s | CPU s / video | p50 / p95 latency s | peak RSS MB | mean batch image / audio "
            "/ text / fusion | frames decoded / sampled |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        b = r["batch_means"]
        lines.append(
            f"| {r['mode']} | {r['videos_per_min']:.2f} | {r['video_s_per_s']:.2f} | {r['wall_s']:.1f} | "
            f"{r['cpu_s_per_video']:.2f} | "
            f"{r['p50_s']:.1f} / {r['p95_s']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{b.get('image', 0):.1f} / {b.get('audio', 0):.1f} / {b.get('text', 0):.1f} / {b.get('fusion', 0):.1f} | "
            f"{r['frames_decoded']} / {r['frames_sampled']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=20, help="how many clips of the set (default 20)")
    p.add_argument("--cache", type=Path, default=default_cache(), help="where the generated clips live")
    p.add_argument("--k", type=int, default=8, help="jobs in flight in the worker (default 8)")
    p.add_argument("--decode-threads", type=int, default=0, help="worker decode threads (0: CPU count)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads, both modes (0: default)")
    p.add_argument("--modes", default="naive,worker", help="which modes, in order (default naive,worker)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child_main(args: argparse.Namespace) -> int:
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    logging.basicConfig(level=logging.WARNING)
    clips = make_clips(args.cache, args.clips)
    out = {"naive": child_naive, "worker": child_worker}[args.child](clips, args)
    out["peak_rss_mb"] = peak_rss_mb()
    out["torch_threads"] = torch.get_num_threads()
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    clips = make_clips(args.cache, args.clips)
    video_s = sum(c.seconds for c in clips)
    load = os.getloadavg()
    results = {mode: run_child(mode, args) for mode in args.modes.split(",")}
    rows = [summarise(m if m != "worker" else f"worker K={args.k}", r, video_s, len(clips)) for m, r in results.items()]
    version = next(iter(results.values()))["model_version"]
    print(f"{len(clips)} clips, {video_s:.0f} s of 1280x720 video; model {version}; torch threads "
          f"{next(iter(results.values()))['torch_threads']}; load average before {load[0]:.2f}, after "
          f"{os.getloadavg()[0]:.2f}\n")
    print(table(rows))
    if "naive" in results and "worker" in results:
        ratio = rows[1]["videos_per_min"] / rows[0]["videos_per_min"]
        print(f"\nworker / naive videos per minute: {ratio:.2f}x (bar: >= 2x: {'met' if ratio >= 2 else 'NOT met'})")
        bad = {k: v for k, v in results["worker"]["statuses"].items() if v != "finished"}
        if bad:
            print(f"worker jobs not finished: {bad}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "raw": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
