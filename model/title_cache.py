"""Frozen text-encoder token states of titles, encoded once per split and cached on disk.

A MultimodalVideoTag folder has titles but no text-encoder states (its pickles hold image and audio
features only; MVT runs ERNIE inside its model). To train the encoder TextCNN on such a folder, as MVT
does with a frozen ERNIE, every title is encoded once by a frozen :class:`model.text.TextEncoder`,
batched, with a progress bar, and the states are kept on disk, one file per split::

    <cache dir>/<encoder id>/<split>.safetensors
        offsets  (N + 1,) int64       title i owns rows offsets[i]:offsets[i + 1] of ``states``
        states   (rows, D) float32    each title's token states ([CLS] ... [SEP], padding removed)
        metadata format, encoder (the id), max_tokens, titles (JSON list of the N titles), titles_sha256

Interpretations:

* Key: the directory is the encoder's id (``<dir name>.<sha12 of its weights>``, model/text.py), and
  a file is reused only when its recorded encoder id, token limit and title list all equal what is
  asked now; anything else (another encoder, an edited list file) encodes the split again and
  replaces the file. A different encoder therefore never reads another's states.
* The titles of a split are its distinct non-empty titles, sorted. An empty (or whitespace-only)
  title is not encoded: it is "no title", zero rows (see model/text.py for why not ``[CLS][SEP]``).
* float32, as the worker computes them, so training and tagging see the same numbers. Size: D x 4
  bytes per token; ERNIE 1.0 base (768-d) on 20-token titles is about 61 KB a title, 4.3 GB for
  70,000 titles. Writing streams batch by batch (the file is laid out from a tokenisation pass
  first), so memory stays at one batch; reading memory-maps the file and slices one title at a time.
* The encoder itself is loaded only when a split has to be encoded: with a valid cache, training
  and prediction never load it (its id and width come from its directory without loading).
* A file is written under a temporary name and renamed, so an interrupted encoding leaves no file
  that looks valid; the next run encodes that split again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors import safe_open

from model.progress import Progress
from model.text import MAX_TOKENS, TextEncoder, build_text_encoder, encoder_dim, encoder_id

log = logging.getLogger(__name__)

FORMAT = "1"
DEFAULT_DIR = ".tagstream-cache/text-states"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def titles_sha256(titles: list[str]) -> str:
    """sha256 of the JSON list of ``titles`` (order matters)."""
    return hashlib.sha256(json.dumps(titles, ensure_ascii=False).encode("utf-8")).hexdigest()


def _write_states(path: Path, metadata: dict[str, str], offsets: np.ndarray, dim: int,
                  rows: Iterable[np.ndarray]) -> None:
    """Write a safetensors file holding ``offsets`` and ``states`` (``offsets[-1]`` x ``dim``),
    streaming the state rows from ``rows`` (which must yield exactly that many) after the header."""
    total = int(offsets[-1])
    n_offsets = offsets.size * 8
    header = {
        "__metadata__": metadata,
        "offsets": {"dtype": "I64", "shape": [int(offsets.size)], "data_offsets": [0, n_offsets]},
        "states": {"dtype": "F32", "shape": [total, dim], "data_offsets": [n_offsets, n_offsets + total * dim * 4]},
    }
    raw = json.dumps(header, ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # tensors start 8-byte aligned
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    written = 0
    try:
        with tmp.open("wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.write(np.ascontiguousarray(offsets, dtype="<i8").tobytes())
            for block in rows:
                block = np.ascontiguousarray(block, dtype="<f4")
                if block.ndim != 2 or block.shape[1] != dim:
                    raise ValueError(f"state rows of shape {block.shape}, expected (n, {dim})")
                f.write(block.tobytes())
                written += len(block)
            if written != total:
                raise ValueError(f"{written} state rows written, the layout promised {total}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class TitleStates:
    """One split's cached states: ``get(title)`` -> ``(L, D)`` float32 (``(0, D)`` for an empty title)."""

    def __init__(self, path: str | Path, dim: int) -> None:
        self.path = Path(path)
        self.dim = int(dim)
        self._file = safe_open(str(self.path), framework="np")
        meta = self._file.metadata() or {}
        self.extractor_id = meta.get("encoder")
        self.titles: list[str] = json.loads(meta.get("titles", "[]"))
        self.offsets = self._file.get_tensor("offsets")
        self._index = {title: i for i, title in enumerate(self.titles)}

    def __len__(self) -> int:
        return len(self.titles)

    def __contains__(self, title: object) -> bool:
        return isinstance(title, str) and (not title.strip() or title in self._index)

    def get(self, title: str) -> np.ndarray:
        """The title's token states; KeyError for a non-empty title this split did not encode."""
        if not title.strip():
            return np.zeros((0, self.dim), np.float32)
        i = self._index[title]
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        if start == end:
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self._file.get_slice("states")[start:end], dtype=np.float32)


class TitleEncoderCache:
    """Encodes titles with the encoder in ``model_dir`` (frozen), caching the states per split.

    ``model_dir`` None is the packaged default encoder. ``cache_dir`` is the cache root (one
    sub-directory per encoder id). The encoder is built on ``device`` only when a split must be
    encoded; ``batch_size`` titles go through it at once; ``progress`` shows a bar (terminal) or log
    lines (otherwise) while encoding."""

    def __init__(
        self,
        model_dir: str | Path | None,
        cache_dir: str | Path,
        *,
        device: str = "auto",
        batch_size: int = 64,
        progress: bool = True,
        encoder: TextEncoder | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.cache_dir = Path(cache_dir)
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.progress = progress
        self._encoder = encoder
        self.extractor_id = encoder.extractor_id if encoder is not None else encoder_id(model_dir)
        self.dim = encoder.feature_dim if encoder is not None else encoder_dim(model_dir)
        self._splits: dict[str, TitleStates] = {}

    @property
    def encoder(self) -> TextEncoder:
        """The frozen encoder, built on first use."""
        if self._encoder is None:
            from model.progress import quiet_model_libraries

            quiet_model_libraries()
            self._encoder = build_text_encoder(self.model_dir, device=self.device)
            if self._encoder.extractor_id != self.extractor_id:  # the directory changed under us
                raise RuntimeError(f"text encoder {self.model_dir}: id {self._encoder.extractor_id}, "
                                   f"expected {self.extractor_id}")
        return self._encoder

    def path(self, split: str) -> Path:
        """The cache file of ``split`` for this encoder."""
        return self.cache_dir / _UNSAFE.sub("_", self.extractor_id) / f"{_UNSAFE.sub('_', split)}.safetensors"

    def _metadata(self, titles: list[str]) -> dict[str, str]:
        return {"format": FORMAT, "encoder": self.extractor_id, "max_tokens": str(MAX_TOKENS),
                "dim": str(self.dim), "titles_sha256": titles_sha256(titles),
                "titles": json.dumps(titles, ensure_ascii=False)}

    def _valid(self, path: Path, titles: list[str]) -> bool:
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # noqa: BLE001 - a damaged file is re-encoded
            log.warning("%s: unreadable text-state cache (%s), encoding again", path, exc)
            return False
        want = self._metadata(titles)
        same = all(meta.get(k) == want[k] for k in ("format", "encoder", "max_tokens", "dim", "titles_sha256"))
        if not same:
            log.info("%s: made for other titles or another encoder, encoding again", path)
        return same

    def split(self, split: str, titles: Iterable[str]) -> TitleStates:
        """The states of ``split``, whose videos have ``titles``: read from the cache when it holds
        exactly these titles for this encoder, else encoded (batched, with progress) and written."""
        wanted = sorted({t for t in titles if isinstance(t, str) and t.strip()})
        cached = self._splits.get(split)
        if cached is not None and cached.titles == wanted:
            return cached
        path = self.path(split)
        if not self._valid(path, wanted):
            self._encode(split, wanted, path)
        states = TitleStates(path, self.dim)
        self._splits[split] = states
        return states

    def _encode(self, split: str, titles: list[str], path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot create the text-state cache {path.parent} ({exc}); "
                          "choose a writable one with --text-cache") from exc
        encoder = self.encoder
        batches = [titles[i : i + self.batch_size] for i in range(0, len(titles), self.batch_size)]
        lengths = []
        for batch in batches:  # tokenising first fixes the file layout, so the states can stream
            lengths += encoder.tokenize(batch)["attention_mask"].sum(dim=1).tolist()
        offsets = np.zeros(len(titles) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lengths, dtype=np.int64)
        log.info("encoding %d titles of split %r with %s into %s", len(titles), split, self.extractor_id, path)

        def rows() -> Iterable[np.ndarray]:
            bar = Progress(len(titles), f"text states {split}", unit="title", enabled=self.progress, logger=log)
            with bar:
                for batch in batches:
                    states, mask = encoder(batch)
                    states, mask = states.float().cpu().numpy(), mask.cpu().numpy()
                    for i in range(len(batch)):
                        yield states[i][mask[i]]
                    bar.update(len(batch))

        _write_states(path, self._metadata(titles), offsets, self.dim, rows())
