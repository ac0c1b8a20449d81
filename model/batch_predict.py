"""``tagstream predict CHECKPOINT INPUT --out FILE``: tag every video of a feature store or a
MultimodalVideoTag feature folder with a checkpoint, batched, resumable.

INPUT (:func:`input_kind`):

* a feature store (``store.json``; model/feature_store.py), written by ``tagstream extract``;
* a MultimodalVideoTag feature folder (``class.txt`` with ``feature_files/``; model/mvt_data.py), read
  as MVT's inference reader reads it: every listed video whose pickle exists, with or without a label
  column (``url \\t title`` lists included). A checkpoint that reads text-encoder states needs
  ``--text-encoder-dir`` (the encoder it was trained with; titles are encoded and cached as in
  training, ``--text-cache``);
* a folder of raw videos (``{train,val,test}.tsv`` naming video files, no features) is recognised but
  not tagged here: decoding and extraction live in the worker, whose ``tagstream predict``
  (``worker/tools/predict.py``) extracts such a folder first; :func:`predict` itself raises
  :class:`VideoFolderInputError` for one.

``--split`` limits the videos to one split; by default every video, in the input's order.

Output (``--format``):

* ``jsonl`` (default): one result document per line, the shape ``tagstream tag`` prints (``schema``,
  ``video_id``, ``status``, ``reason``, ``model_version``, ``categories``, ``tags`` with segments,
  ``concepts``, ``media``, ``timings_s``, ``finished_at``), scores rounded as the worker rounds them (4
  digits, segments 2). Built here from model-side data: ``concepts`` is empty (features carry no
  ImageNet scores), ``media`` has ``duration_s`` and ``frames`` from the features, ``audio_s`` = audio
  patches x 0.96 s for a store and null for an MVT folder (its empty audio is filled with zeros, as
  MVT does, so the count says nothing), ``width``/``height`` null; ``timings_s`` has the video's share
  of its batch's load time (``decode``) and model time (``fusion``), the other stages 0.
* ``mvt``: MultimodalVideoTag's ``inference.py`` output: one JSON list (``indent=4``, UTF-8) of
  ``{"video_id": ..., "labels": [[name, prob], ...]}``, labels in output-index order as MVT lists
  them, names as MVT prints them (for an index with aliases, the name ``class.txt`` gave it last;
  model/labels.py), ``prob`` the unrounded probability. ``video_id`` is the list's url (MVT prints the
  pickle's ``video`` field, which MVT's own extraction sets to that url, and which a Python 2 pickle
  holds as mojibake).

Selection (model/predict.py ``select``): ``--top-k K`` the K best; ``--threshold T`` every tag at or
above T; both: at or above T, at most K. Neither: ``--top-k 5`` for jsonl (the worker's default),
``--threshold 0.5`` for mvt (MVT's default). Unused outputs are never listed.

Resume: a rerun with the same ``--out`` skips the videos already written. JSONL is appended and
flushed after each batch (a torn last line from a crash is cut off, so the file stays valid).
For ``--format mvt`` the per-video entries go to the JSON Lines sidecar ``FILE.partial.jsonl`` as
they are made, and FILE is (re)written from it at the end, atomically, in input order; the sidecar
is kept so a later run can skip and rewrite. Lines made by another model version are refused
(exit 2; ``--restart`` starts the output over). Changing ``--threshold`` / ``--top-k`` between runs
is not detected: the lines already written keep their selection (use ``--restart``).

A video whose features cannot be read is logged and left out (a rerun tries it again); the exit
status is then 1. A one-line JSON summary goes to stdout: ``written``, ``skipped`` (already in the
output), ``failed``, ``videos`` (in the output now), ``out``, ``format``, ``model_version``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from model.checkpoint import CheckpointMismatchError, LoadedCheckpoint, check_extractors, load_checkpoint
from model.errors import InputError
from model.feature_store import STORE, FeatureSource, read_jsonl
from model.features import VideoFeatures
from model.mvt_data import FEATURE_DIR, open_source
from model.predict import Prediction, Tagger, resolve_device, select
from model.progress import Progress

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "mvt")
SCHEMA_VERSION = 1  # the result document's schema (the worker's, README "The Redis contract")
TIMING_KEYS = ("queue_wait", "decode", "image", "audio", "text", "fusion", "total")
SIDECAR_SUFFIX = ".partial.jsonl"
SPLIT_LISTS = ("train.tsv", "val.tsv", "test.tsv")


class VideoFolderInputError(InputError):
    """INPUT is a folder of raw videos; it has to go through ``tagstream extract`` first."""


class OutputMismatchError(InputError):
    """The output to resume holds lines written by another model version."""


def input_kind(path: str | Path) -> str:
    """What INPUT is: ``"store"`` (has ``store.json``), ``"mvt"`` (has ``class.txt`` and
    ``feature_files/``, or ``class.txt`` and no ``.tsv`` lists), ``"videos"`` (a ``.tsv`` file, or a
    folder with ``{train,val,test}.tsv`` lists naming video files and no features).
    FileNotFoundError for anything else."""
    root = Path(path)
    if root.is_file() and root.suffix == ".tsv":
        return "videos"
    if (root / STORE).is_file():
        return "store"
    if (root / "class.txt").is_file() and (root / FEATURE_DIR).is_dir():
        return "mvt"
    if any((root / name).is_file() for name in SPLIT_LISTS):
        return "videos"
    if (root / "class.txt").is_file():
        return "mvt"
    raise FileNotFoundError(f"{root}: not a feature store ({STORE}), a MultimodalVideoTag feature folder "
                            f"(class.txt, {FEATURE_DIR}/) or a folder of videos ({', '.join(SPLIT_LISTS)})")


def _num(value: float | None, ndigits: int) -> float | None:
    if value is None or not math.isfinite(float(value)):
        return None
    return round(float(value), ndigits)


def _utc_now_iso() -> str:
    now = _dt.datetime.now(_dt.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def result_document(
    prediction: Prediction,
    video: VideoFeatures,
    *,
    model_version: str,
    audio_known: bool,
    load_s: float = 0.0,
    fusion_s: float = 0.0,
) -> dict[str, Any]:
    """The result document of one video tagged from its features (the worker's shape; see the module
    docstring for how ``concepts``, ``media`` and ``timings_s`` are filled from features)."""
    pred = prediction.to_dict()
    categories = [{**c, "score": _num(c["score"], 4)} for c in pred["categories"]]
    tags = [{**t, "score": _num(t["score"], 4), "segments": [[_num(a, 2), _num(b, 2)] for a, b in t["segments"]]}
            for t in pred["tags"]]
    audio_s = _num(len(video.audio) * VideoFeatures.AUDIO_PATCH_S, 3) if audio_known else None
    timings = dict.fromkeys(TIMING_KEYS, 0.0)
    timings.update(decode=_num(load_s, 4), fusion=_num(fusion_s, 4), total=_num(load_s + fusion_s, 4))
    return {
        "schema": SCHEMA_VERSION,
        "video_id": video.video_id,
        "status": "tagged",
        "reason": None,
        "model_version": model_version,
        "categories": categories,
        "tags": tags,
        "concepts": [],
        "media": {"duration_s": _num(video.duration_s, 3), "frames": int(len(video.image)), "audio_s": audio_s,
                  "width": None, "height": None},
        "timings_s": timings,
        "finished_at": _utc_now_iso(),
    }


def mvt_entry(probs: np.ndarray, ckpt: LoadedCheckpoint, video_id: str, *, top_k: int | None,
              threshold: float | None) -> dict[str, Any]:
    """MVT's ``{"video_id", "labels": [[name, prob], ...]}`` for one video's (C,) probabilities, the
    selected labels in output-index order (as MVT's ``np.where(prob >= threshold)``)."""
    chosen = sorted(select(probs, top_k=top_k, threshold=threshold, exclude=ckpt.labels.unused))
    return {"video_id": video_id, "labels": [[ckpt.labels.labels[i], float(probs[i])] for i in chosen]}


def read_done(path: Path, model_version: str) -> dict[str, dict]:
    """``video_id -> line`` of the complete lines of the JSON Lines file ``path`` (absent: empty), read as
    :func:`model.feature_store.read_jsonl` reads (a torn last line ignored); a line written by another model
    version is an :class:`OutputMismatchError`."""
    done: dict[str, dict] = {}
    for row in read_jsonl(path):
        if row.get("model_version") != model_version:
            raise OutputMismatchError(f"{path} holds results of model {row.get('model_version')!r}, not "
                                      f"{model_version!r}; choose another --out or pass --restart")
        done.setdefault(row["video_id"], row)
    return done


def _open_append(path: Path) -> IO[str]:
    """``path`` opened for appending, a torn last line (a crash mid-write) cut off first, so the
    output stays valid JSON Lines."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    return path.open("a", encoding="utf-8")


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=4) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def video_ids(source: FeatureSource, split: str | None) -> list[str]:
    """The videos to tag, in the input's order: every split (train, val, test, then any other) or one."""
    splits = [split] if split else ["train", "val", "test"] + sorted(set(source.splits()) - {"train", "val", "test"})
    return [vid for s in splits for vid in source.split_ids(s)]


def predict(
    ckpt_dir: str | Path,
    input_path: str | Path,
    out: str | Path,
    *,
    fmt: str = "jsonl",
    top_k: int | None = None,
    threshold: float | None = None,
    split: str | None = None,
    text_encoder_dir: str | Path | None = None,
    text_cache: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    progress: bool = True,
    restart: bool = False,
) -> dict[str, Any]:
    """Tag the videos of ``input_path`` into ``out`` (see the module docstring); returns the summary.

    Raises :class:`VideoFolderInputError` for a folder of raw videos, CheckpointMismatchError when the
    input's features come from other extractors than the checkpoint's, :class:`OutputMismatchError`
    for an output written by another model."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    kind = input_kind(input_path)
    if kind == "videos":
        raise VideoFolderInputError(
            f"{input_path} is a folder of videos (TSV lists of video files, no features): extract its features "
            f"first with 'tagstream extract {input_path} STORE', then run 'tagstream predict {ckpt_dir} STORE'")
    if top_k is None and threshold is None:
        top_k, threshold = (5, None) if fmt == "jsonl" else (None, 0.5)
    dev = resolve_device(device)
    ckpt = load_checkpoint(ckpt_dir, device=dev)
    source = open_source(input_path, text_encoder_dir=text_encoder_dir, text_cache=text_cache, device=str(dev),
                         batch_size=batch_size, progress=progress, infer=True)
    expected = {name: (info or {}).get("id") for name, info in source.extractors.items()}
    check_extractors(ckpt.config, ckpt.extractors, expected)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines_path = out if fmt == "jsonl" else out.with_name(out.name + SIDECAR_SUFFIX)
    if restart:
        lines_path.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
    done = read_done(lines_path, ckpt.version)
    ids = video_ids(source, split)
    todo = [vid for vid in ids if vid not in done]
    tagger = Tagger(ckpt, top_k=top_k, threshold=threshold, device=dev, batch_size=batch_size)
    audio_known = kind == "store"
    written = failed = 0
    log.info("predict: %d videos, %d already in %s, %d to tag with model %s", len(ids), len(ids) - len(todo),
             lines_path, len(todo), ckpt.version)
    with _open_append(lines_path) as f, Progress(len(todo), "predict", unit="video", enabled=progress,
                                                  logger=log) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            t0 = time.perf_counter()
            videos = []
            for vid in chunk:
                try:
                    videos.append(source.load(vid))
                except Exception as exc:  # noqa: BLE001 - one unreadable video never stops the run
                    log.warning("%s: features not readable, skipped (%s: %s)", vid, type(exc).__name__, exc)
                    failed += 1
            t1 = time.perf_counter()
            rows: list[dict] = []
            if videos:
                if fmt == "jsonl":
                    preds = tagger.predict(videos)
                    share_load, share_fusion = (t1 - t0) / len(videos), (time.perf_counter() - t1) / len(videos)
                    rows = [result_document(p, v, model_version=ckpt.version, audio_known=audio_known,
                                            load_s=share_load, fusion_s=share_fusion)
                            for p, v in zip(preds, videos, strict=True)]
                else:
                    probs = tagger.scores(videos)
                    rows = [{**mvt_entry(p, ckpt, v.video_id, top_k=top_k, threshold=threshold),
                             "model_version": ckpt.version} for p, v in zip(probs, videos, strict=True)]
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[row["video_id"]] = row
            f.flush()
            written += len(rows)
            bar.update(len(chunk))
        os.fsync(f.fileno())
    if fmt == "mvt":
        entries = [{"video_id": vid, "labels": done[vid]["labels"]} for vid in ids if vid in done]
        _write_json_atomic(out, entries)
    return {"written": written, "skipped": len(ids) - len(todo), "failed": failed,
            "videos": sum(1 for vid in ids if vid in done), "out": str(out), "format": fmt,
            "model_version": ckpt.version}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory (tagstream train's OUT_CKPT)")
    parser.add_argument("input", help="feature store dir or MultimodalVideoTag feature folder")
    parser.add_argument("--out", required=True, help="output file (JSON Lines, or one JSON list with --format mvt)")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="jsonl",
                        help="jsonl: result documents, one per line; mvt: MultimodalVideoTag's inference JSON")
    parser.add_argument("--top-k", type=int, default=None,
                        help="list at most K tags (default 5 for jsonl when --threshold is not given)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="list every tag with probability >= T (default 0.5 for --format mvt)")
    parser.add_argument("--split", default=None, help="only the videos of this split (default: all)")
    parser.add_argument("--text-encoder-dir", default=None,
                        help="MultimodalVideoTag folder: the text encoder the checkpoint was trained with")
    parser.add_argument("--text-cache", default=None,
                        help="where encoded titles are cached (default: INPUT/.tagstream-cache/text-states)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=64, help="videos per model batch (and titles per encoder batch)")
    parser.add_argument("--restart", action="store_true", help="discard what --out already holds")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (on a terminal) or progress log lines (otherwise)")
    parser.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 every video tagged (or already there), 1 some could not be read, 2 the checkpoint
    does not fit the input's features or the output holds another model's results. A folder of raw
    videos raises :class:`VideoFolderInputError`."""
    try:
        summary = predict(args.checkpoint, args.input, args.out, fmt=args.fmt, top_k=args.top_k,
                          threshold=args.threshold, split=args.split, text_encoder_dir=args.text_encoder_dir,
                          text_cache=args.text_cache, device=args.device, batch_size=args.batch_size,
                          progress=args.progress, restart=args.restart)
    except CheckpointMismatchError as exc:
        hint = ""
        if "no text features" in str(exc):
            hint = " (pass --text-encoder-dir with the encoder the checkpoint was trained with)"
        log.error("%s%s", exc, hint)
        return 2
    except OutputMismatchError as exc:
        log.error("%s", exc)
        return 2
    print(json.dumps(summary, ensure_ascii=False))
    return 1 if summary["failed"] else 0
