"""Pipeline throughput as K and decode threads vary, against decode-only (issue 6; BENCHMARKS.md "## Pipeline").

For each point ``K:T[:I]`` (jobs in flight, decode threads, optional inference threads; 0 = auto) a fresh
subprocess starts a private redis-server, loads and warms the models, enqueues the clips at once and runs a
:class:`worker.jobs.worker.TagWorker` in burst mode (as ``bench_worker.py``). For each decode thread count
``T`` a fresh subprocess runs *decode-only*: T threads doing exactly the pipeline's decode work (the
:class:`worker.media.source.VideoSource` chunks, RGB frames at 224, audio cut into VGGish patches) with no
extractors. Reported per run: videos/min, video-seconds/s, mean batch size / max batch size per extractor,
peak RSS (VmHWM), and end-to-end / decode-only throughput for the same T.

    python scripts/bench_pipeline.py                                 # default points, 6 clips
    python scripts/bench_pipeline.py --points 8:2:1,8:2:2 --decode-only 2 --plot out.png
    python scripts/bench_pipeline.py --small-backbone --points 8:1,8:2 --decode-only 1,2   # issue 6's 70% target
Clips: the first ``--clips`` of ``bench_clips.py`` (default 6: 55 s of 720p, keyframe intervals 1/2/4 s).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_clips import Clip, default_cache, make_clips  # noqa: E402
from bench_gpu_decode import decode_source  # noqa: E402
from bench_worker import bench_settings, cpu_s, hwm_mb, load_warm_models, peak_rss_mb, rss, run_worker_batch  # noqa: E402

DEFAULT_POINTS = "1:1,2:2,4:2,8:2,16:2,8:1,8:3"


def decode_only(clips: list[Clip], threads: int) -> dict:
    """The pipeline's decode work for ``clips`` on ``threads`` threads, nothing downstream: the same
    source (a decode-pool child with ``decode_isolation``, else an in-thread ``VideoSource``) and the same
    VGGish patching of the audio in the decode thread."""
    from worker.media.records import DecodeLimits
    from worker.media.sampling import SamplingPolicy
    from worker.media.source import VideoSource

    settings = bench_settings(decode_threads=threads, allowed_roots=[str(clips[0].path.parent)])
    policy = SamplingPolicy(fps=settings.fps, max_frames=settings.max_frames)
    limits = DecodeLimits.from_settings(settings)
    pool = None
    if settings.decode_isolation:
        from worker.media.isolation import DecodePool

        pool = DecodePool.from_settings(settings, threads)
    todo: queue.Queue[Clip] = queue.Queue()
    for clip in clips:
        todo.put(clip)
    counts = {"frames": 0, "patches": 0}
    lock = threading.Lock()

    def work() -> None:
        while True:
            try:
                clip = todo.get_nowait()
            except queue.Empty:
                return
            uri = str(clip.path)
            open_source = (partial(pool.source, uri, policy, limits) if pool is not None
                           else partial(VideoSource, uri, policy, limits))  # crop 224, short side 256: the defaults
            r = decode_source(open_source, keep=False)
            with lock:
                counts["frames"] += r["frames_sampled"]
                counts["patches"] += r["patches"]

    c0, t0 = cpu_s(), time.time()
    pool_threads = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool_threads:
        t.start()
    for t in pool_threads:
        t.join()
    wall = time.time() - t0
    decoder_rss = 0.0
    if pool is not None:
        decoder_rss = max((hwm_mb(pid) for pid in pool.pids()), default=0.0)
        pool.close()  # reaps the children, so their CPU time is counted
    return {"wall_s": wall, "cpu_s": cpu_s() - c0, "decoder_peak_rss_mb": decoder_rss,
            "decoder_processes": threads if pool is not None else 0, **counts}


def child(args: argparse.Namespace) -> dict:
    import torch

    from worker.metrics import Metrics
    from worker.tools.local_redis import LocalRedis

    clips = make_clips(args.cache, args.clips)
    kind, k, threads, inference = args.child.split(":")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("rq.worker").addFilter(lambda record: record.levelno >= logging.WARNING)
    out: dict = {}
    if kind == "decode":
        out = decode_only(clips, int(threads))
    else:
        image = {}
        if args.small_backbone:  # features only: the shipped fusion model was trained on other features
            image = {"image_arch": "mobilenet_v3_small", "image_weights": small_backbone_weights(args.cache)}
        with LocalRedis() as server:
            settings = bench_settings(redis_url=server.url, concurrency=int(k), decode_threads=int(threads),
                                      inference_threads=int(inference), allowed_roots=[str(clips[0].path.parent)],
                                      **image)  # fmt: skip
            models = load_warm_models(settings, with_tagger=not args.small_backbone)
            out["image_extractor"] = models.extractors.image.extractor_id
            out.update(run_worker_batch(clips, settings, models, Metrics()))
            out["max_batch"] = {"image": settings.resolved_image_batch_size("cpu"), "audio": settings.audio_batch_size,
                                "text": settings.text_batch_size, "fusion": settings.fusion_batch_size}
            out["model_version"] = str(models.model_version)
            out["inference_threads"] = settings.resolved_inference_threads("cpu")
    out.update(kind=kind, k=int(k), threads=int(threads), peak_rss_mb=peak_rss_mb())
    out.setdefault("torch_threads", torch.get_num_threads())
    return out


def small_backbone_weights(cache: Path) -> Path:
    """A torchvision MobileNetV3-Small state dict with RANDOM weights (seed 0), made once in ``cache``:
    the "small image backbone" of issue 6's pipeline target. Speed only; no ImageNet weights ship offline."""
    import torch
    from torchvision.models import mobilenet_v3_small

    path = cache / "mobilenet_v3_small_random_seed0.pth"
    if not path.exists():
        torch.manual_seed(0)
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(mobilenet_v3_small(weights=None).state_dict(), path)
    return path


def run_point(spec: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", spec, "--clips", str(args.clips),
           "--cache", str(args.cache), "--torch-threads", str(args.torch_threads)]
    if args.small_backbone:
        cmd.append("--small-backbone")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load1"] = os.getloadavg()[0]
    return out


def report(results: list[dict], clips: list[Clip]) -> str:
    n, video_s = len(clips), sum(c.seconds for c in clips)
    decode = {(r["threads"], r.get("rep", 0)): r for r in results if r["kind"] == "decode"}
    lines = ["| run | K | decode threads | inference / torch threads | videos/min | video-s/s | vs decode-only (same threads) | "
             "CPU s / video | decode-only CPU / this CPU | mean/max batch image, audio, text | peak RSS MB | load (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        vpm, vss = 60.0 * n / r["wall_s"], video_s / r["wall_s"]
        if r["kind"] == "decode":
            lines.append(f"| decode-only | - | {r['threads']} | - / {r['torch_threads']} | {vpm:.1f} | {vss:.2f} | 100% | "
                         f"{r['cpu_s'] / n:.2f} | 100% | - | {rss(r)} | {r['load1']:.1f} |")
            continue
        d = decode.get((r["threads"], r.get("rep", 0)))  # decode-only of the same repetition
        rel = f"{100.0 * d['wall_s'] / r['wall_s']:.0f}%" if d else "-"
        rel_cpu = f"{100.0 * d['cpu_s'] / r['cpu_s']:.0f}%" if d else "-"
        b, m = r["batch_means"], r["max_batch"]
        fill = ", ".join(f"{b.get(x, 0):.1f}/{m[x]}" for x in ("image", "audio", "text"))
        bad = sum(1 for s in r["statuses"].values() if s != "finished")
        failed = f" ({bad} failed)" if bad else ""
        lines.append(f"| worker{failed} | {r['k']} | {r['threads']} | "
                     f"{r['inference_threads']} / {r['torch_threads']} | {vpm:.1f} | {vss:.2f} | {rel} | "
                     f"{r['cpu_s'] / n:.2f} | {rel_cpu} | {fill} | {rss(r)} | {r['load1']:.1f} |")
    return "\n".join(lines)


def plot(results: list[dict], clips: list[Clip], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(clips)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    workers = [r for r in results if r["kind"] == "worker"]
    for threads, inf in sorted({(r["threads"], r.get("inference_threads", 1)) for r in workers}):
        pts = sorted((r["k"], 60.0 * n / r["wall_s"]) for r in workers
                     if (r["threads"], r.get("inference_threads", 1)) == (threads, inf))
        ax.plot(*zip(*pts, strict=True), "o-", label=f"end to end, {threads} decode / {inf} inference thr.")
    for r in results:
        if r["kind"] == "decode":
            ax.axhline(60.0 * n / r["wall_s"], ls="--", lw=1, color="gray")
            ax.annotate(f"decode-only {r['threads']} thr.", (1, 60.0 * n / r["wall_s"]), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (jobs in flight)")
    ax.set_ylabel("videos / min")
    ax.legend(fontsize=7)
    for threads in sorted({r["threads"] for r in workers}):
        pts = sorted((r["k"], r["peak_rss_mb"]) for r in workers if r["threads"] == threads)
        ax2.plot(*zip(*pts, strict=True), "s-", label=f"{threads} decode thr. (worker process)")
    ax2.legend(fontsize=7)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("K (jobs in flight)")
    ax2.set_ylabel("peak RSS MB")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=6)
    p.add_argument("--cache", type=Path, default=default_cache())
    p.add_argument("--points", default=DEFAULT_POINTS, help="K:T[:inference_threads],... worker runs")
    p.add_argument("--decode-only", default="1,2,3", help="decode thread counts for decode-only runs")
    p.add_argument("--repeat", type=int, default=1, help="run the whole list this many times, in turn")
    p.add_argument("--torch-threads", type=int, default=0, help="default torch threads of every run (0: torch's)")
    p.add_argument("--plot", type=Path, default=None, help="write the throughput / RSS plot (PNG) here")
    p.add_argument("--json", type=Path, default=None, help="write the raw results here (and merge with it)")
    p.add_argument("--small-backbone", action="store_true",
                   help="workers use MobileNetV3-Small (random weights, features only) instead of EfficientNet-Lite0")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    clips = make_clips(args.cache, args.clips)
    specs = [f"decode:0:{t}:0" for t in args.decode_only.split(",") if t]
    for point in (x for x in args.points.split(",") if x):
        k, t, *rest = point.split(":")
        specs.append(f"worker:{k}:{t}:{rest[0] if rest else 0}")
    results = json.loads(args.json.read_text()) if args.json and args.json.is_file() else []
    print(f"{len(clips)} clips, {sum(c.seconds for c in clips):.0f} s of 720p video; image extractor "
          f"{'MobileNetV3-Small (random weights, no fusion)' if args.small_backbone else 'EfficientNet-Lite0 + fusion'}; "
          f"load before {os.getloadavg()[0]:.2f}", flush=True)
    for rep, spec in ((rep, spec) for rep in range(args.repeat) for spec in specs):
        results.append({**run_point(spec, args), "rep": rep})
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    print(report(results, clips))
    if args.plot:
        plot(results, clips, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
