"""Worker throughput against a naive baseline (issue 4's bar; BENCHMARKS.md "## Worker").

Both run the same clips (``bench_clips.py``: 20 generated 720p H.264/AAC clips) with the same extractors
and, when a fusion checkpoint is found (``model/assets/tagstream-small`` or ``TAGSTREAM_CHECKPOINT``), the
same fusion model; otherwise both run features-only. Each mode is a long-lived subprocess (its own peak
RSS, VmHWM) that loads and warms its models once; the clips are split into ``--rounds`` rounds run in
ABBA order (naive, worker, worker, naive, ...) so that both modes see the same drift in the machine's
load. In a round all its clips are enqueued at t=0: end-to-end latency = result time - round start.
Throughput = videos / summed round wall time. CPU seconds (user + system, all threads and the decoder
child processes) are reported too: on a loaded machine they are steadier than wall time.

* ``worker``: the real thing: a private redis-server (``worker.tools.local_redis``), jobs enqueued with
  ``worker.jobs.enqueue.enqueue_video``, :class:`worker.jobs.worker.TagWorker` with K jobs in flight over the
  :class:`worker.engine.pipeline.Pipeline` (decode threads, cross-video batches), burst mode. Latency = rq's
  ``ended_at`` - round start; mean batch sizes from the ``tagstream_batch_size`` histogram.
* ``naive``: one video at a time: PyAV decodes *every* frame (default PyAV threading), the frame nearest
  each sampling target is converted (same resize 256 + centre crop 224), audio is decoded to 16 kHz mono
  and cut into VGGish patches; then frames go through the image extractor one by one, patches through the
  audio extractor one by one, the title through the text encoder, then fusion for that one video.

    python scripts/bench_worker.py --torch-threads 1   # K=8, 20 clips, 2 rounds: a Markdown table
    python scripts/bench_worker.py --clips 6 --k 4     # quicker
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
    return hwm_mb("self")


def hwm_mb(pid: int | str = "self") -> float:
    """VmHWM of process ``pid`` in MB (reset by exec, unlike ru_maxrss); 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def cpu_s() -> float:
    """User + system CPU seconds so far of this process (all threads) and of its reaped children (the
    decoder processes of decode isolation count once the pipeline has stopped and reaped them)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def bench_settings(**overrides):
    """Settings for a benchmark worker on CPU (no metrics port; torch threads from the caller)."""
    from worker.config import Settings

    base = {"device": "cpu", "metrics_port": 0, "queue": "bench", "job_retries": 0, "heartbeat_interval_s": 1.0}
    return Settings(**{**base, **overrides})


def load_warm_models(settings, with_tagger: bool = True):
    """Load the models the way the worker does and run each once (first calls allocate and plan)."""
    import numpy as np
    import torch

    from worker.engine.models import load_models

    models = load_models(settings, with_tagger=with_tagger)
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


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (for decoder children not yet reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class WorkerRunner:
    """A Pipeline (decode pool started) that runs batches of clips through a burst-mode TagWorker.

    CPU time of a batch = this process's (all threads) + its decode-pool children's, read from /proc
    while they live (and from RUSAGE_CHILDREN for any that were reaped)."""

    def __init__(self, settings, models, metrics) -> None:
        import redis

        from worker.engine.pipeline import Pipeline

        self.settings, self.models, self.metrics = settings, models, metrics
        self.conn = redis.Redis.from_url(settings.redis_url)
        self.pipeline = Pipeline(settings, models, metrics)
        self.pipeline.start()
        self.pool = getattr(self.pipeline, "_decode_pool", None)

    def _cpu(self) -> float:
        return cpu_s() + sum(proc_cpu_s(pid) for pid in (self.pool.pids() if self.pool is not None else []))

    def decoder_rss_mb(self) -> float:
        return max((hwm_mb(pid) for pid in self.pool.pids()), default=0.0) if self.pool is not None else 0.0

    def run(self, clips: list[Clip]) -> dict:
        """Enqueue ``clips`` at once and run a TagWorker in burst mode until they are all done."""
        from rq.job import Job
        from rq.serializers import JSONSerializer

        from worker.jobs.enqueue import enqueue_video
        from worker.jobs.worker import TagWorker
        from worker.keys import job_id_for, result_key

        c0, t0 = self._cpu(), time.time()
        for clip in clips:
            enqueue_video(self.conn, clip.video_id, str(clip.path), clip.title, self.settings)
        TagWorker(self.settings, self.conn, self.pipeline, model_version=str(self.models.model_version),
                  metrics=self.metrics).work(burst=True)
        cpu = self._cpu() - c0
        latencies, statuses, frames_decoded, frames, last = [], {}, 0, 0, t0
        for clip in clips:
            job = Job.fetch(job_id_for(clip.video_id), connection=self.conn, serializer=JSONSerializer)
            status = job.get_status().value
            statuses[clip.video_id] = status if status == "finished" else f"{status}: {(job.meta or {}).get('reason')}"
            doc = json.loads(self.conn.get(result_key(clip.video_id)) or "{}")
            if job.ended_at is not None:
                latencies.append(job.ended_at.timestamp() - t0)
                last = max(last, job.ended_at.timestamp())
            frames += int((doc.get("media") or {}).get("frames") or 0)
            frames_decoded += int((doc.get("decode") or {}).get("frames_decoded") or 0)
        import torch

        return {"wall_s": last - t0, "cpu_s": cpu, "latencies_s": latencies, "statuses": statuses,
                "frames_sampled": frames, "frames_decoded": frames_decoded, "torch_threads": torch.get_num_threads()}

    def close(self) -> dict:
        """Stop the pipeline; returns the end-of-run facts (batch means, decoder RSS)."""
        out = {"batch_means": batch_means(self.metrics), "decoder_peak_rss_mb": self.decoder_rss_mb(),
               "decoder_processes": self.pool.size if self.pool is not None else 0}
        self.pipeline.stop(timeout=10)
        return out


def run_worker_batch(clips: list[Clip], settings, models, metrics) -> dict:
    """One batch of ``clips`` through a fresh :class:`WorkerRunner` (pipeline stopped afterwards)."""
    runner = WorkerRunner(settings, models, metrics)
    try:
        out = runner.run(clips)
    finally:
        out_end = runner.close()
    return {**out, **out_end}


def _naive_video(clip: Clip, models, settings) -> tuple[int, int]:
    """One video the naive way; returns (frames decoded, frames sampled)."""
    import av
    import numpy as np
    import torch

    from model.audio_frontend import waveform_to_patches
    from model.features import VideoFeatures
    from worker.media.audio import AUDIO_RATE
    from worker.media.sampling import SamplingPolicy

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


class NaiveRunner:
    """The baseline: one video at a time (see the module docstring)."""

    def __init__(self, settings, models) -> None:
        self.settings, self.models = settings, models

    def run(self, clips: list[Clip]) -> dict:
        c0, t0 = cpu_s(), time.time()
        latencies, decoded, sampled = [], 0, 0
        for clip in clips:
            d, s = _naive_video(clip, self.models, self.settings)
            decoded, sampled = decoded + d, sampled + s
            latencies.append(time.time() - t0)
        return {"wall_s": latencies[-1], "cpu_s": cpu_s() - c0, "latencies_s": latencies,
                "statuses": {c.video_id: "finished" for c in clips}, "frames_decoded": decoded,
                "frames_sampled": sampled}

    def close(self) -> dict:
        return {"batch_means": {"image": 1.0, "audio": 1.0, "text": 1.0, "fusion": 1.0}}


def serve(args: argparse.Namespace) -> int:
    """Child: load the models once, then run each batch of clip indices read from stdin (one JSON list a
    line) and answer with one JSON line; at EOF print the end-of-run facts (peak RSS, batch means)."""
    import contextlib

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("rq.worker").addFilter(lambda record: record.levelno >= logging.WARNING)
    clips = make_clips(args.cache, args.clips)
    with contextlib.ExitStack() as stack:
        if args.child == "worker":
            from worker.metrics import Metrics
            from worker.tools.local_redis import LocalRedis

            server = stack.enter_context(LocalRedis())
            settings = bench_settings(redis_url=server.url, concurrency=args.k, decode_threads=args.decode_threads,
                                      allowed_roots=[str(clips[0].path.parent)])
            models = load_warm_models(settings)
            runner: WorkerRunner | NaiveRunner = WorkerRunner(settings, models, Metrics())
        else:
            settings = bench_settings()
            models = load_warm_models(settings)
            runner = NaiveRunner(settings, models)
        print(json.dumps({"ready": True, "model_version": str(models.model_version),
                          "torch_threads": torch.get_num_threads()}), flush=True)
        for line in sys.stdin:
            print(json.dumps(runner.run([clips[i] for i in json.loads(line)])), flush=True)
        end = runner.close()
    print(json.dumps({**end, "peak_rss_mb": peak_rss_mb()}), flush=True)
    return 0


class Child:
    """The parent's handle on a serving child (one per mode)."""

    def __init__(self, mode: str, args: argparse.Namespace) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--clips", str(args.clips),
               "--cache", str(args.cache), "--k", str(args.k), "--decode-threads", str(args.decode_threads),
               "--torch-threads", str(args.torch_threads)]
        self.mode = mode
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello: dict = {}

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.mode} child exited with {self.proc.wait()}")
        return json.loads(line)

    def ready(self) -> dict:
        self.hello = self._read()
        return self.hello

    def run(self, indices: list[int]) -> dict:
        self.proc.stdin.write(json.dumps(indices) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def finish(self) -> dict:
        self.proc.stdin.close()
        out = self._read()
        self.proc.wait()
        return out


def merge(rounds: list[dict], end: dict, hello: dict) -> dict:
    """Totals over rounds: wall and CPU summed, latencies pooled (each from its round's start)."""
    out = {"wall_s": sum(r["wall_s"] for r in rounds), "cpu_s": sum(r["cpu_s"] for r in rounds),
           "latencies_s": [x for r in rounds for x in r["latencies_s"]],
           "statuses": {k: v for r in rounds for k, v in r["statuses"].items()},
           "frames_decoded": sum(r["frames_decoded"] for r in rounds),
           "frames_sampled": sum(r["frames_sampled"] for r in rounds), "rounds": rounds}
    return {**out, **end, **hello}


def summarise(name: str, r: dict, video_s: float, n: int) -> dict:
    lat = r["latencies_s"]
    return {"mode": name, "videos_per_min": 60.0 * n / r["wall_s"], "video_s_per_s": video_s / r["wall_s"],
            "wall_s": r["wall_s"], "cpu_s_per_video": r["cpu_s"] / n, "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95),
            "peak_rss_mb": r["peak_rss_mb"], "decoder_peak_rss_mb": r.get("decoder_peak_rss_mb", 0.0),
            "decoder_processes": r.get("decoder_processes", 0), "batch_means": r["batch_means"],
            "frames_decoded": r["frames_decoded"], "frames_sampled": r["frames_sampled"]}


def rss(r: dict) -> str:
    """Peak RSS of the process, plus its decoder children's (each) when decoding is isolated."""
    own = f"{r['peak_rss_mb']:.0f}"
    if r.get("decoder_processes"):
        own += f" + {r['decoder_processes']} x {r['decoder_peak_rss_mb']:.0f}"
    return own


def table(rows: list[dict]) -> str:
    head = ("| mode | videos/min | video-s/s | wall s | CPU s / video | p50 / p95 latency s | peak RSS MB | mean batch image / audio "
            "/ text / fusion | frames decoded / sampled |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        b = r["batch_means"]
        lines.append(
            f"| {r['mode']} | {r['videos_per_min']:.2f} | {r['video_s_per_s']:.2f} | {r['wall_s']:.1f} | "
            f"{r['cpu_s_per_video']:.2f} | "
            f"{r['p50_s']:.1f} / {r['p95_s']:.1f} | {rss(r)} | "
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
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds, ABBA order (default 2)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return serve(args)
    clips = make_clips(args.cache, args.clips)
    video_s = sum(c.seconds for c in clips)
    loads = [os.getloadavg()[0]]
    children = {mode: Child(mode, args) for mode in ("naive", "worker")}
    for child in children.values():
        child.ready()
    rounds: dict[str, list[dict]] = {mode: [] for mode in children}
    for r in range(args.rounds):  # ABBA...: each mode sees the machine's load drift alike
        indices = list(range(r, len(clips), args.rounds))
        order = ("naive", "worker") if r % 2 == 0 else ("worker", "naive")
        for mode in order:
            rounds[mode].append(children[mode].run(indices))
            loads.append(os.getloadavg()[0])
    results = {mode: merge(rounds[mode], child.finish(), child.hello) for mode, child in children.items()}
    rows = [summarise(m if m != "worker" else f"worker K={args.k}", r, video_s, len(clips)) for m, r in results.items()]
    print(f"{len(clips)} clips, {video_s:.0f} s of 1280x720 video, in {args.rounds} interleaved rounds; model "
          f"{results['worker']['model_version']}; torch threads {results['worker']['torch_threads']}; "
          f"1-min load average during the run: {min(loads):.1f} to {max(loads):.1f}\n")
    print(table(rows))
    ratio = rows[1]["videos_per_min"] / rows[0]["videos_per_min"]
    cpu_ratio = rows[0]["cpu_s_per_video"] / rows[1]["cpu_s_per_video"]
    print(f"\nworker / naive videos per minute: {ratio:.2f}x (bar: >= 2x: {'met' if ratio >= 2 else 'NOT met'}); "
          f"CPU seconds per video naive / worker: {cpu_ratio:.2f}x")
    bad = {k: v for k, v in results["worker"]["statuses"].items() if v != "finished"}
    if bad:
        print(f"worker jobs not finished: {bad}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "raw": results, "loads": loads}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
