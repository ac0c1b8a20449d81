"""The worker main process's CPU per one-minute 720p video, for everything except model kernels (issue 17).

At 50 one-minute videos/s a GPU box's worker has 20 ms of main-process CPU per video for all its Python
work; the bar is 10 ms. This runs the real engine (:class:`worker.engine.pipeline.Pipeline`, isolated
decoder processes, the default extractors and the shipped fusion checkpoint, on CPU) over ``--videos``
copies of bench_gpu.py's 60 s 720p clip (2 s GOP, AAC) with titles, and reports per video:

* ``main CPU``: this process's CPU time (``time.process_time``: all its threads, not its decoder
  processes) from the first submit to the last result;
* ``kernels``: the CPU time spent inside the model networks, measured per call as the calling thread's
  CPU time (``time.thread_time``) between forward pre- and post-hooks on the image extractor, the audio
  extractor, the text encoder's transformer (not its tokenizer) and the fusion network (not its collate).
  On CPU with more than one inference thread the pipeline runs torch with one intra-op thread, so a
  kernel's work happens on the calling thread and is counted there;
* ``host``: main CPU minus kernels: receiving frames and patches, batching, tokenising, collating,
  building results. On CPU nothing is pinned or copied to a device, so the GPU path's pinning and copies
  are not in it;
* ``idle engine``: the CPU per second of the started engine with nothing to do (its threads poll their
  queues every 0.1 s), measured for 5 s before the videos;
* ``host per-video work``: host minus idle engine x wall time, per video: what each further video costs,
  which is what the bar applies to. On this CPU box a video takes seconds of model time, so the fixed
  polling cost per video is far larger here than at 50 videos/s, where it is negligible.

``--stand-in`` replaces the image backbone and classifier and the text transformer by modules that return
zeros of the right shapes, and batches images 64 at a time (the accelerator default; 8 on CPU): the main
process then does what it does on a GPU box, where the host cores run no image or text kernels.

``--trees A B`` runs the same measurement on other checkouts (each in its own process, alternated
``--rounds`` times) and prints them side by side: how the before/after rows of BENCHMARKS.md were made.
``--profile N`` instead profiles every thread of this process (cProfile per thread, merged) over N videos
and prints the functions with the most own time.

    python scripts/bench_host_cpu.py                       # this checkout, 16 videos, 2 rounds
    python scripts/bench_host_cpu.py --trees . /tmp/base   # side by side with another checkout
    python scripts/bench_host_cpu.py --profile 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

IDLE_S = 5.0
TITLES = ["周末去海边冲浪的一天", "How to make fresh pasta at home", "猫咪第一次见到雪的反应",
          "Mountain bike downhill, full run", "街头篮球 三对三 决赛", "Unboxing the new camera and first test"]  # fmt: skip


def stand_in_networks(extractors) -> None:
    """Replace the image backbone and classifier and the text transformer by modules that return zeros of
    the right shapes at no cost; everything around them (conversion, batching, scatter) stays."""
    import torch
    from torch import nn

    class Zeros(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.dim = dim

        def forward(self, x):
            return x.new_zeros((len(x), self.dim), dtype=torch.float32)

    class Hidden:
        def __init__(self, states):
            self.last_hidden_state = states

    class ZeroTransformer(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.dim = dim
            self.anchor = nn.Parameter(torch.zeros(1))  # TextEncoder.device reads a parameter

        def forward(self, input_ids, attention_mask=None, **_):  # the older code also passes token_type_ids
            return Hidden(torch.zeros((*input_ids.shape, self.dim)))

    image = extractors.image
    image.backbone, image.classifier = Zeros(image.feature_dim), Zeros(1000)
    extractors.text.model = ZeroTransformer(extractors.text.feature_dim)


def measure(root: Path, videos: int, warmup: int, profile: bool, stand_in: bool = False) -> dict:
    """One measurement in this process, importing the project from ``root``."""
    sys.path[:0] = [str(root), str(root / "scripts")]
    os.environ["PYTHONPATH"] = os.pathsep.join(sys.path[:2])  # the decoder processes import root's code too
    os.chdir(root)  # (``python -m`` puts the working directory first)
    import threading

    import torch
    from bench_gpu_decode import make_clip

    from worker.config import Settings
    from worker.engine.models import load_models
    from worker.engine.pipeline import Pipeline
    from worker.engine.request import VideoRequest

    clip = str(make_clip(Path("/tmp/tagstream-gpu-bench"), 60.0))
    # with stand-in networks the engine batches as on a GPU (image batches of 64, the accelerator default)
    settings = Settings(device="cpu", hwaccel="none", decode_isolation=True, decode_threads=2, concurrency=8,
                        metrics_port=0, image_batch_size=64 if stand_in else 0)
    models = load_models(settings)
    if stand_in:
        stand_in_networks(models.extractors)
    kernel_s = [0.0]
    local = threading.local()
    lock = threading.Lock()

    def pre(_module, _args):
        local.t0 = time.thread_time()

    def post(_module, _args, _out):
        spent = time.thread_time() - local.t0
        with lock:
            kernel_s[0] += spent

    ex = models.extractors
    networks = [ex.image, ex.audio, ex.text.model] + ([models.tagger.model] if models.tagger is not None else [])
    for net in networks:
        net.register_forward_pre_hook(pre)
        net.register_forward_hook(post)

    profiles = []
    if profile:
        import cProfile

        run = threading.Thread.run

        def profiled_run(self):
            prof = cProfile.Profile(time.thread_time)  # CPU time of the thread, not time blocked
            profiles.append(prof)
            prof.runcall(run, self)

        threading.Thread.run = profiled_run
    with Pipeline(settings, models) as pipeline:
        def batch(n: int) -> None:
            futures = [pipeline.submit(VideoRequest(f"v{i}", clip, title=TITLES[i % len(TITLES)])) for i in range(n)]
            for f in futures:
                f.result(timeout=600)

        batch(warmup)
        c0 = time.process_time()
        time.sleep(IDLE_S)  # what the started engine costs while it has nothing to do (its threads' polling)
        idle_cpu_per_s = (time.process_time() - c0) / IDLE_S
        kernel_s[0] = 0.0
        c0, t0 = time.process_time(), time.perf_counter()
        batch(videos)
        main_cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        kernels = kernel_s[0]
    out = {"videos": videos, "wall_s": wall, "main_cpu_ms": 1e3 * main_cpu / videos,
           "kernel_cpu_ms": 1e3 * kernels / videos, "host_cpu_ms": 1e3 * (main_cpu - kernels) / videos,
           "idle_cpu_ms_per_s": 1e3 * idle_cpu_per_s,
           "per_video_cpu_ms": 1e3 * (main_cpu - kernels - idle_cpu_per_s * wall) / videos,
           "torch_threads": torch.get_num_threads()}
    if profile:
        print_profile(profiles, videos)
    return out


#: What the profile reports, per video: (label, function name, file name ending), CPU time including callees.
PROFILED = [
    ("receive a chunk from a decoder process", "chunks", "media/isolation.py"),
    ("cut log-mel patches (main process)", "push", "audio_frontend.py"),
    ("batcher: handle one event", "_handle", "engine/pipeline.py"),
    ("batcher: take a batch", "take", "engine/buffers.py"),
    ("extractor batch incl. kernels", "compute", "engine/inference.py"),
    ("  image extractor incl. kernels", "forward", "model/image.py"),
    ("  text encoder incl. kernels", "encode_ids", "model/text.py"),
    ("  text encoder incl. kernels and tokenising (before 2026-12-03)", "forward", "model/text.py"),
    ("tokenise a title (at submit)", "token_ids", "model/text.py"),
    ("scatter results into videos", "apply", "engine/inference.py"),
    ("fusion incl. kernels", "predict", "model/predict.py"),
    ("  collate", "collate", "model/collate.py"),
    ("result document", "video_document", "engine/document.py"),
    ("whole batcher thread", "_batch_loop_inner", "engine/pipeline.py"),
]


def print_profile(profiles: list, videos: int) -> None:
    """Per-video CPU milliseconds (including callees) of the functions in :data:`PROFILED`, every thread."""
    import pstats

    stats = pstats.Stats(profiles[0])
    for prof in profiles[1:]:
        stats.add(prof)
    print("| step (every thread of the main process) | CPU ms/video incl. callees |\n|---|---:|")
    for label, func, suffix in PROFILED:
        cum = sum(v[3] for (file, _, name), v in stats.stats.items() if name == func and file.endswith(suffix))
        print(f"| {label} | {1e3 * cum / videos:.1f} |")
    ours = [(v[2], f"{Path(file).parent.name}/{Path(file).name}:{line}({name})")
            for (file, line, name), v in stats.stats.items() if "/worker/" in file or "/model/" in file]
    print("\n| the project's functions with the most own CPU time | ms/video |\n|---|---:|")
    for own, where in sorted(ours, reverse=True)[:15]:
        print(f"| {where} | {1e3 * own / videos:.2f} |")


def child(root: Path, videos: int, warmup: int, stand_in: bool) -> dict:
    """:func:`measure` in a fresh process with ``root``'s project on the path (its decoder processes too)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "scripts")])}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(root), "--videos", str(videos),
           "--warmup", str(warmup), *(["--stand-in"] if stand_in else [])]
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measurement in {root} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", nargs="+", default=["."], help="checkouts to measure, side by side")
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", type=int, default=0, help="profile every thread over this many videos instead")
    ap.add_argument("--stand-in", action="store_true",
                    help="image and text networks replaced by zero-cost stand-ins (as on a GPU box, the host "
                         "cores then run no image or text kernels)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child), args.videos, args.warmup, profile=False, stand_in=args.stand_in)))
        return 0
    if args.profile:
        print(json.dumps(measure(Path(args.trees[0]).resolve(), args.profile, args.warmup, profile=True,
                                 stand_in=args.stand_in)))
        return 0
    networks = "stand-in image and text networks" if args.stand_in else "the real networks"
    print(f"{args.videos} one-minute 720p videos per row, {networks}, load average {os.getloadavg()[0]:.1f} "
          "at the start")
    print("| checkout | round | videos/s | main CPU ms/video | model kernels ms/video | host ms/video "
          "| idle engine ms/s | host per-video work ms/video |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in range(args.rounds):
        for tree in args.trees:
            m = child(Path(tree).resolve(), args.videos, args.warmup, args.stand_in)
            print(f"| {tree} | {r + 1} | {m['videos'] / m['wall_s']:.2f} | {m['main_cpu_ms']:.1f} "
                  f"| {m['kernel_cpu_ms']:.1f} | {m['host_cpu_ms']:.1f} | {m.get('idle_cpu_ms_per_s', 0):.2f} "
                  f"| {m.get('per_video_cpu_ms', m['host_cpu_ms']):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
