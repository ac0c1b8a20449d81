"""``tagstream extract DATA_DIR OUT_DIR``: features of a folder of videos, into our feature store.

``DATA_DIR`` is laid out like MultimodalVideoTag's data (and the synthetic generator's output):
``{train,val,test}.tsv`` with rows ``<file> \\t <title> \\t <label1>,<label2>`` where ``<file>`` is a
path relative to ``DATA_DIR`` (e.g. ``videos/<id>.mp4``), plus an optional ``class.txt`` (one label per
line). The video id is the file name without its extension. Missing title or label columns are empty.

Every video goes through the worker's own :class:`~worker.engine.pipeline.Pipeline` (same decoder, same
sampling, same extractors, batched across videos) with ``features_only=True``, and its
:class:`~model.features.VideoFeatures` are written to a :class:`~model.feature_store.FeatureStoreWriter`.

Resumable: ids already in the store (or recorded there as permanently failed, unless
``--retry-failed``) are skipped. A failed video is logged and counted, never fatal; permanent failures
(bad media) are recorded in the store's ``failed.jsonl``, transient ones (timeouts) are retried by the
next run. A one-line JSON summary goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path

from model.feature_store import FeatureStoreWriter
from model.features import VideoFeatures
from model.labels import LabelSet
from model.progress import Progress
from worker.config import Settings, add_settings_arguments, settings_from_args
from worker.engine.models import load_models
from worker.engine.pipeline import Pipeline
from worker.engine.request import VideoRequest
from worker.errors import TagstreamError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SETTINGS = [
    "image_arch", "image_weights", "vggish_weights", "vggish_pca", "text_encoder_dir", "device", "fps",
    "max_frames", "max_duration_s", "max_pixels", "decode_budget_s", "hwaccel", "decode_threads",
    "concurrency", "image_batch_size", "audio_batch_size", "text_batch_size", "batch_max_wait_s", "log_level",
]


@dataclass
class Row:
    video_id: str
    path: Path
    title: str
    labels: list[str]
    split: str


@dataclass
class Summary:
    written: int = 0
    skipped: int = 0
    failed: int = 0
    failed_reasons: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, int | dict[str, int]]:
        return {"written": self.written, "skipped": self.skipped, "failed": self.failed,
                "failed_reasons": dict(self.failed_reasons)}


def read_split(data_dir: Path, split: str) -> list[Row]:
    """Rows of ``DATA_DIR/<split>.tsv`` (blank lines and ``#`` comments skipped)."""
    path = data_dir / f"{split}.tsv"
    rows = []
    for line in path.read_text("utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        cols = line.rstrip("\r\n").split("\t")
        file = cols[0].strip()
        title = cols[1].strip() if len(cols) > 1 else ""
        labels = [x.strip() for x in cols[2].split(",") if x.strip()] if len(cols) > 2 else []
        rows.append(Row(Path(file).stem, data_dir / file, title, labels, split))
    return rows


def read_labels(data_dir: Path, rows: list[Row]) -> LabelSet:
    """``class.txt`` when present, read as MultimodalVideoTag reads it (:meth:`model.labels.LabelSet.from_file`:
    line numbers or ``name\tindex`` columns, blank lines, aliases), else the sorted labels seen in the TSVs."""
    class_txt = data_dir / "class.txt"
    if class_txt.is_file():
        return LabelSet.from_file(class_txt)
    return LabelSet(sorted({label for row in rows for label in row.labels}))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, help="folder with {train,val,test}.tsv and the videos")
    parser.add_argument("out_dir", type=Path, help="feature store directory (created or continued)")
    parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated splits to extract")
    parser.add_argument("--limit", type=int, default=0, help="at most N rows per split (0: all)")
    parser.add_argument("--retry-failed", action="store_true", help="retry videos recorded as failed")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (on a terminal) or progress log lines (otherwise)")
    add_settings_arguments(parser, _SETTINGS)


def extract(data_dir: str | Path, out_dir: str | Path, *, splits: tuple[str, ...] = SPLITS, limit: int = 0,
            settings: Settings | None = None, retry_failed: bool = False, progress: bool = True) -> Summary:
    """Extract every listed video not yet in the store; returns what was written, skipped and failed.
    ``progress``: a bar on a terminal, periodic log lines otherwise (:class:`model.progress.Progress`)."""
    settings = settings or Settings()
    data_dir = Path(data_dir)
    rows: list[Row] = []
    for split in splits:
        if not (data_dir / f"{split}.tsv").is_file():
            log.warning("%s has no %s.tsv; skipping that split", data_dir, split)
            continue
        split_rows = read_split(data_dir, split)
        rows += split_rows[:limit] if limit > 0 else split_rows
    models = load_models(settings, with_tagger=False)
    sampling = {"fps": settings.fps, "max_frames": settings.max_frames}
    summary = Summary()
    with FeatureStoreWriter(out_dir, extractors=models.extractors.ids(), sampling=sampling,
                            labels=read_labels(data_dir, rows), retry_failed=retry_failed) as writer:
        todo = []
        seen: set[str] = set()
        for row in rows:
            if writer.has(row.video_id) or row.video_id in seen:
                summary.skipped += 1
            else:
                seen.add(row.video_id)
                todo.append(row)
        log.info("%d videos to extract, %d already in %s", len(todo), summary.skipped, out_dir)
        bar = Progress(len(todo), "extract", unit="video", enabled=progress and bool(todo), logger=log)
        pending: dict[Future[VideoFeatures], Row] = {}

        def collect(row: Row, future: Future[VideoFeatures]) -> None:
            try:
                features = future.result()
            except TagstreamError as exc:
                summary.failed += 1
                summary.failed_reasons[exc.reason] = summary.failed_reasons.get(exc.reason, 0) + 1
                log.warning("%s (%s): %s: %s", row.video_id, row.path, exc.reason, exc)
                if exc.permanent:
                    writer.record_failure(row.video_id, row.split, exc.reason)
            else:
                features.labels = list(row.labels)
                writer.write(features, row.split)
                summary.written += 1
            bar.update(1)
            bar.set_postfix(failed=summary.failed)

        with Pipeline(settings, models) as pipeline:
            window = max(settings.concurrency, 2 * pipeline.decode_threads)  # the decoders the engine chose

            def drain(until: int) -> None:
                while len(pending) > until:
                    done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                    for future in done:
                        collect(pending.pop(future), future)

            for row in todo:
                drain(window - 1)
                request = VideoRequest(video_id=row.video_id, uri=str(row.path.resolve()), title=row.title)
                pending[pipeline.submit(request, features_only=True)] = row
            drain(0)
        bar.close()
    return summary


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    summary = extract(args.data_dir, args.out_dir, splits=splits, limit=args.limit, settings=settings,
                      retry_failed=args.retry_failed, progress=not args.no_progress)
    sys.stdout.write(json.dumps(summary.to_dict()) + "\n")
    return 0
