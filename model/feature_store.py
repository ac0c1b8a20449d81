"""Our feature store: features of videos we extract ourselves, one file per video plus a manifest.

Layout of a store directory::

    store.json        {"format": 1, "extractors": {"image": {"id", "dim"}, "audio": {...}, "text": {...}},
                       "sampling": {"fps": 1.0, "max_frames": 300}}
    labels.txt        the label list (class.txt order) when the writer was given one
    manifest.jsonl    one JSON object per stored video: video_id, title, labels, split, file,
                      duration_s, frames, audio_patches, text_tokens
    failed.jsonl      videos that could not be extracted: video_id, split, reason
    videos/<name>.safetensors   tensors image (T_i, D_i) f32, image_times (T_i,) f64,
                                audio (T_a, 128) f32, text (L, D_t) f32

Crash safety and resume: a video's file is written to a temporary name and renamed, then its manifest
line is appended and flushed, so a video is "in the store" exactly when its manifest line is complete.
A torn last line (crash mid-write) is ignored by readers and completed with a newline by the next
writer. Re-opening a store with :class:`FeatureStoreWriter` continues it; ``has(video_id)`` tells
what is done. A store written by other extractors (other ids) cannot be continued.

:func:`model.mvt_data.open_source` opens either this store or a MultimodalVideoTag folder
behind the same small interface (:class:`FeatureSource`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
from safetensors.numpy import load_file, save_file

from model.errors import InputError
from model.features import VideoFeatures
from model.labels import LabelSet

log = logging.getLogger(__name__)

FORMAT = 1
STORE = "store.json"
MANIFEST = "manifest.jsonl"
FAILED = "failed.jsonl"
LABELS = "labels.txt"
VIDEOS = "videos"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class FeatureSource(Protocol):
    """What training and evaluation need from a data set on disk."""

    labels: LabelSet
    extractors: dict[str, dict]
    sampling: dict

    @property
    def dims(self) -> dict[str, int]: ...

    def splits(self) -> dict[str, int]: ...

    def split_ids(self, split: str) -> list[str]: ...

    def load(self, video_id: str) -> VideoFeatures: ...


def _file_name(video_id: str) -> str:
    digest = hashlib.sha1(video_id.encode("utf-8")).hexdigest()[:10]
    return f"{_UNSAFE.sub('_', video_id)[:80]}-{digest}.safetensors"


def read_jsonl(path: Path) -> list[dict]:
    """The objects of the JSON Lines file ``path`` (absent: none). A torn last line (a crash mid-write) and
    malformed lines are skipped with a warning: the files are appended to by resumable runs."""
    rows: list[dict] = []
    if not path.is_file():
        return rows
    with path.open("r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith("\n"):
                log.warning("%s: ignoring a torn last line (%d)", path, n)
                break
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("%s: ignoring malformed line %d", path, n)
    return rows


def _matrix(a: np.ndarray, dim: int) -> np.ndarray:
    """(T, D) float32; an empty array of any shape becomes (0, dim)."""
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 2:
        return np.ascontiguousarray(a)
    if a.size == 0:
        return np.zeros((0, dim), np.float32)
    return np.ascontiguousarray(a.reshape(len(a), -1))


class FeatureStoreWriter:
    """Append videos to a store (creating it, or continuing one written by the same extractors).

    Thread-safe: ``write`` may be called from several threads."""

    def __init__(
        self,
        out_dir: str | Path,
        extractors: dict[str, dict],
        sampling: dict,
        *,
        labels: LabelSet | list[str] | None = None,
        retry_failed: bool = False,
    ) -> None:
        self.root = Path(out_dir)
        (self.root / VIDEOS).mkdir(parents=True, exist_ok=True)
        self.extractors = json.loads(json.dumps(extractors))
        self.sampling = json.loads(json.dumps(sampling))
        store = self.root / STORE
        if store.is_file():
            meta = json.loads(store.read_text("utf-8"))
            old = {k: (v or {}).get("id") for k, v in meta.get("extractors", {}).items()}
            new = {k: (v or {}).get("id") for k, v in self.extractors.items()}
            if old != new:
                raise InputError(f"{self.root} holds features from extractors {old}, not {new}")
        else:
            meta = {"format": FORMAT, "extractors": self.extractors, "sampling": self.sampling}
            tmp = store.with_name(STORE + ".tmp")
            tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, store)
        if labels is not None:
            label_set = labels if isinstance(labels, LabelSet) else LabelSet(labels)
            label_set.to_file(self.root / LABELS)
        self._done = {row["video_id"] for row in read_jsonl(self.root / MANIFEST)}
        self._failed = set() if retry_failed else {r["video_id"] for r in read_jsonl(self.root / FAILED)}
        self._lock = threading.Lock()
        self._manifest = self._open_append(self.root / MANIFEST)
        self._failures = self._open_append(self.root / FAILED)

    @staticmethod
    def _open_append(path: Path):
        torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        f = path.open("a", encoding="utf-8")
        if torn:
            f.write("\n")  # finish a torn line so it stays a (skipped) malformed line
            f.flush()
        return f

    def __enter__(self) -> FeatureStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, video_id: str) -> bool:
        """True when the video is stored (or recorded as failed, unless ``retry_failed``)."""
        with self._lock:
            return video_id in self._done or video_id in self._failed

    def __len__(self) -> int:
        return len(self._done)

    def _dim(self, modality: str, default: int) -> int:
        return int((self.extractors.get(modality) or {}).get("dim") or default)

    def write(self, features: VideoFeatures, split: str) -> None:
        """Store one video's features under ``split`` (train / val / test)."""
        name = _file_name(features.video_id)
        tensors = {
            "image": np.ascontiguousarray(features.image, dtype=np.float32),
            "image_times": np.ascontiguousarray(features.image_times, dtype=np.float64),
            "audio": _matrix(features.audio, self._dim("audio", 128)),
            "text": _matrix(features.text, self._dim("text", 0)),
        }
        path = self.root / VIDEOS / name
        tmp = path.with_name(f"{name}.{threading.get_ident()}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        row = {
            "video_id": features.video_id,
            "title": features.title,
            "labels": list(features.labels),
            "split": split,
            "file": f"{VIDEOS}/{name}",
            "duration_s": float(features.duration_s),
            "frames": int(len(features.image)),
            "audio_patches": int(len(features.audio)),
            "text_tokens": int(len(features.text)),
        }
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._lock:
            self._manifest.write(line)
            self._manifest.flush()
            self._done.add(features.video_id)

    def record_failure(self, video_id: str, split: str, reason: str) -> None:
        line = json.dumps({"video_id": video_id, "split": split, "reason": reason}, ensure_ascii=False) + "\n"
        with self._lock:
            self._failures.write(line)
            self._failures.flush()
            self._failed.add(video_id)

    def close(self) -> None:
        with self._lock:
            for f in (self._manifest, self._failures):
                if not f.closed:
                    f.flush()
                    os.fsync(f.fileno())
                    f.close()


class FeatureStore:
    """Read a store. A video listed twice (re-extracted) is the last entry."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta = json.loads((self.root / STORE).read_text("utf-8"))
        self.extractors: dict[str, dict] = meta.get("extractors", {})
        self.sampling: dict = meta.get("sampling", {})
        rows = read_jsonl(self.root / MANIFEST)
        self.records: dict[str, dict] = {row["video_id"]: row for row in rows}
        self.failures = read_jsonl(self.root / FAILED)
        if (self.root / LABELS).is_file():
            self.labels = LabelSet.from_file(self.root / LABELS)
        else:
            self.labels = LabelSet(sorted({label for row in self.records.values() for label in row["labels"]}))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def extractor_ids(self) -> dict[str, str | None]:
        return {name: (info or {}).get("id") for name, info in self.extractors.items()}

    @property
    def dims(self) -> dict[str, int]:
        """Feature widths from ``store.json`` (read from the first video where a dim is missing)."""
        dims = {k: int((self.extractors.get(k) or {}).get("dim") or 0) for k in ("image", "audio", "text")}
        if (not dims["image"] or not dims["audio"]) and self.records:
            first = self.load(next(iter(self.records)))
            dims["image"] = dims["image"] or int(first.image.shape[1])
            dims["audio"] = dims["audio"] or (int(first.audio.shape[1]) if first.audio.ndim == 2 else 128) or 128
        return dims

    def splits(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.records.values():
            counts[row["split"]] = counts.get(row["split"], 0) + 1
        return counts

    def split_ids(self, split: str) -> list[str]:
        return [vid for vid, row in self.records.items() if row["split"] == split]

    def load(self, video_id: str) -> VideoFeatures:
        row = self.records[video_id]
        t = load_file(str(self.root / row["file"]))
        return VideoFeatures(
            video_id=video_id,
            image=t["image"],
            image_times=t["image_times"],
            audio=t["audio"],
            text=t["text"],
            title=row.get("title", ""),
            labels=list(row.get("labels", [])),
            duration_s=float(row.get("duration_s", 0.0)),
        )

    def iter(self, split: str | None = None) -> Iterator[VideoFeatures]:
        for vid, row in self.records.items():
            if split is None or row["split"] == split:
                yield self.load(vid)
