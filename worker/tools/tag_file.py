"""``tagstream tag FILE``: tag one local file without Redis and print the result document as JSON.

The same :class:`~worker.engine.pipeline.Pipeline` as the worker runs the file, so the printed document is
exactly what a worker would write to ``tagstream:tags:{video_id}`` (:mod:`worker.engine.document`). The file is
the user's own: no URI policy applies, but the decode limits of the settings do. Exit status 0 with a
``"tagged"`` document, 1 with a ``"failed"`` document (its ``reason`` says why), 2 when the models
cannot be loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from worker.config import Settings, add_settings_arguments, settings_from_args
from worker.engine.document import Document, failed_document
from worker.engine.models import load_models
from worker.engine.pipeline import Pipeline
from worker.engine.request import VideoRequest
from worker.errors import NotFoundError, TagstreamError

log = logging.getLogger(__name__)

_SETTINGS = [
    "checkpoint", "image_arch", "image_weights", "vggish_weights", "vggish_pca", "text_encoder_dir", "device",
    "fps", "max_frames", "max_duration_s", "max_pixels", "max_file_bytes", "decode_budget_s",
    "allow_audio_only", "hwaccel", "top_k_tags", "top_k_concepts", "image_batch_size", "audio_batch_size",
    "decode_threads", "log_level",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a local video file")
    parser.add_argument("--title", default="", help="the video's title (optional; helps the text branch)")
    parser.add_argument("--video-id", default=None, help="id in the document (default: the file name stem)")
    parser.add_argument("--timeout", type=float, default=None, help="fail with reason 'timeout' after this many seconds")
    parser.add_argument("--indent", type=int, default=2, help="JSON indentation (0: one line)")
    add_settings_arguments(parser, _SETTINGS)


def tag_file(path: str | Path, *, title: str = "", video_id: str | None = None, settings: Settings | None = None,
             timeout: float | None = None) -> Document:
    """Tag one file and return its result document (``"tagged"`` or ``"failed"``)."""
    settings = settings or Settings()
    path = Path(path).expanduser()
    video_id = video_id or path.stem
    models = load_models(settings)
    if not path.is_file():
        return failed_document(video_id, NotFoundError(f"no such file: {path}"), model_version=models.model_version)
    deadline = None if timeout is None else time.monotonic() + timeout
    request = VideoRequest(video_id=video_id, uri=str(path.resolve()), title=title, deadline=deadline)
    with Pipeline(settings, models) as pipeline:
        future = pipeline.submit(request)
        try:
            return future.result()
        except TagstreamError as exc:
            return failed_document(video_id, exc, model_version=models.model_version)


def run(args: argparse.Namespace) -> int:
    overrides = {}
    if args.setting_decode_threads is None:
        overrides["decode_threads"] = 1  # one file: one decoder is all it can use
    settings = settings_from_args(args, **overrides)
    try:
        doc = tag_file(args.file, title=args.title, video_id=args.video_id, settings=settings, timeout=args.timeout)
    except (FileNotFoundError, ValueError) as exc:
        log.error("cannot load the models: %s", exc)
        return 2
    json.dump(doc, sys.stdout, indent=args.indent or None, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0 if doc["status"] == "tagged" else 1
