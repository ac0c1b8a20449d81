"""Reader for MultimodalVideoTag's (PaddleVideo) data set format, exactly as published.

Accepted folder layout (MVT keeps these under ``datasets/``; point us at that folder)::

    class.txt                  one "level1-level2" label per line, optionally "\\t<index>"; read as MVT's
                               ``load_class_file`` reads it (model/labels.py: blank lines keep their
                               index, names sharing an index are aliases of one output)
    train.txt  val.txt  test.txt
                               TSV without header: ``url_or_file \\t title \\t label1,label2``
                               (``train.list`` / ``val.list`` / ``test.list`` are accepted too); a list
                               for inference may have no label column (``url \\t title``)
    feature_files/<stem>.pkl   one pickle per video, ``<stem> = url.split('/')[-1].split('.')[0]``:
                               {'video': ..., 'feature': {'image_pkl': (T1, 2048), 'audio_pkl': (T2, 128)},
                                'label': [...]}

Reading follows MVT's ``FeatureReader``: pickles are loaded with ``encoding='iso-8859-1'`` (they were
written by Python 2, whose ``str`` fields therefore arrive as latin-1 ``str``); an empty ``audio_pkl``
becomes ``zeros((10, 128))`` exactly as MVT does (so a model trained there and here sees the same
input; pass ``empty_audio_zeros=False`` to keep it empty and let the model mask it instead); a
missing/NaN title is ""; rows none of whose labels is a name in ``class.txt`` (a label or an alias)
are skipped, as are rows whose pickle is missing (with a warning); a repeated url keeps its first
row. Labels in the TSV win over the pickle's ``label`` field.

Inference lists: with ``infer=True`` the reader does what MVT's reader does in its ``infer`` mode:
every row whose pickle exists is kept, labelled or not (``url \\t title`` lists included; labels
that are known are kept for reference, unknown ones dropped, none is fine). Without it, a label-less
list gives no videos (training and evaluation need labels).

Time stamps: MVT's features are about one frame per second, so frame i is at ``i / fps`` seconds
(``fps`` = 1.0 by default) and the duration is ``T1 / fps``.

Text: these pickles carry no text features; the title string feeds the character branch. For the
encoder branch (MVT: a frozen ERNIE 1.0 feeding a TextCNN) pass ``text_cache``, a
:class:`model.title_cache.TitleEncoderCache`: each split's titles are encoded once by that frozen
encoder (batched, cached on disk per split and encoder id) and a video's ``text`` is its title's token
states; ``extractors["text"]`` is then the encoder's id and width, which checkpoints record.
:func:`open_source` builds it from ``--text-encoder-dir`` / ``--text-cache``. An empty title has zero
rows ("no title", model/text.py explains why not MVT's ``[CLS][SEP]``). Without an encoder,
``extractors["text"]`` is ``{"id": None, "dim": 0}`` and only the character branch can read titles.

Safety: a pickle can name any function to call while it is loaded (``os.system`` included). The
per-video pickles are therefore read with :mod:`model.safe_pickle`, which resolves only what plain
data and NumPy arrays need (as Python 2 and 3 NumPy write them) and raises
:class:`model.safe_pickle.UnsafePickleError` (naming the file and the refused global) for anything
else, before calling it: opening a folder (which reads the first pickle for the image width) or
loading a video never runs code from the folder.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from model.errors import InputError
from model.feature_store import STORE, FeatureSource, FeatureStore
from model.features import VideoFeatures
from model.labels import LabelSet
from model.safe_pickle import load_file
from model.title_cache import DEFAULT_DIR, TitleEncoderCache, TitleStates

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FEATURE_DIR = "feature_files"
IMAGE_ID = "mvt-resnet50"
AUDIO_ID = "mvt-vggish"


def pickle_stem(url: str) -> str:
    """MVT's rule: ``url.split('/')[-1].split('.')[0]``."""
    return url.split("/")[-1].split(".")[0]


def read_tsv(
    path: Path, known: set[str] | None, *, keep_unlabelled: bool = False
) -> list[tuple[str, str, list[str]]]:
    """Rows ``(url, title, labels)``; labels filtered to ``known``. A row left without labels is
    dropped, unless ``keep_unlabelled`` (MVT's inference reader: the label column is not read)."""
    rows: list[tuple[str, str, list[str]]] = []
    seen: set[str] = set()
    with path.open("r", encoding="utf-8", newline="") as f:
        for fields in csv.reader(f, delimiter="\t"):
            if not fields or not fields[0].strip():
                continue
            url = fields[0].strip()
            title = fields[1] if len(fields) > 1 else ""
            title = "" if title.strip().lower() in ("", "nan") else title
            raw = fields[2].strip() if len(fields) > 2 else ""
            labels = [x.strip() for x in raw.split(",") if x.strip()]
            if known is not None:
                labels = [x for x in labels if x in known]
            if url in seen or not (labels or keep_unlabelled):
                continue
            seen.add(url)
            rows.append((url, title, labels))
    return rows


class MVTDataset:
    """A MultimodalVideoTag folder behind the :class:`model.feature_store.FeatureSource` interface."""

    def __init__(
        self,
        root: str | Path,
        *,
        fps: float = 1.0,
        empty_audio_zeros: bool = True,
        infer: bool = False,
        text_cache: TitleEncoderCache | None = None,
    ) -> None:
        self.root = Path(root)
        self.fps = float(fps)
        self.empty_audio_zeros = empty_audio_zeros
        self.infer = infer
        self.text_cache = text_cache
        self._text_states: dict[str, TitleStates] = {}
        self.labels = LabelSet.from_file(self.root / "class.txt")
        known = set(self.labels.index)  # labels and their aliases
        self.rows: dict[str, tuple[str, str, list[str]]] = {}  # url -> (split, title, labels)
        for split in SPLITS:
            for name in (f"{split}.txt", f"{split}.list"):
                path = self.root / name
                if not path.is_file():
                    continue
                for url, title, labels in read_tsv(path, known, keep_unlabelled=infer):
                    if not self._pickle(url).is_file():
                        log.warning("%s: no feature file %s, skipped", name, self._pickle(url).name)
                        continue
                    self.rows.setdefault(url, (split, title, labels))
                break
        image_dim = 2048
        if self.rows:
            image_dim = int(self._read(next(iter(self.rows)))["feature"]["image_pkl"].shape[1])
        self.extractors: dict[str, dict] = {
            "image": {"id": IMAGE_ID, "dim": image_dim},
            "audio": {"id": AUDIO_ID, "dim": 128},
            "text": {"id": text_cache.extractor_id, "dim": text_cache.dim} if text_cache else {"id": None, "dim": 0},
        }
        self.sampling: dict = {"fps": self.fps, "max_frames": 300}

    def _pickle(self, url: str) -> Path:
        return self.root / FEATURE_DIR / (pickle_stem(url) + ".pkl")

    def _read(self, url: str) -> dict:
        """The video's pickle, loaded with the restricted unpickler (never runs code; see above)."""
        return load_file(self._pickle(url), encoding="iso-8859-1")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dims(self) -> dict[str, int]:
        return {k: int(v["dim"]) for k, v in self.extractors.items()}

    def splits(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for split, _, _ in self.rows.values():
            counts[split] = counts.get(split, 0) + 1
        return counts

    def split_ids(self, split: str) -> list[str]:
        return [url for url, (s, _, _) in self.rows.items() if s == split]

    def text_states(self, split: str) -> TitleStates:
        """The cached encoder states of ``split``'s titles (encoded on first use; needs ``text_cache``)."""
        if self.text_cache is None:
            raise ValueError("no text encoder configured")
        states = self._text_states.get(split)
        if states is None:
            titles = [title for s, title, _ in self.rows.values() if s == split]
            states = self._text_states[split] = self.text_cache.split(split, titles)
        return states

    def load(self, video_id: str) -> VideoFeatures:
        split, title, labels = self.rows[video_id]
        feature = self._read(video_id)["feature"]
        image = np.asarray(feature["image_pkl"], dtype=np.float32)
        audio = np.asarray(feature["audio_pkl"], dtype=np.float32)
        if audio.shape[0] == 0:
            audio = np.zeros((10, 128), np.float32) if self.empty_audio_zeros else np.zeros((0, 128), np.float32)
        if self.text_cache is not None:
            text = self.text_states(split).get(title)  # (0, D) for an empty title: no title
        else:
            text = np.zeros((0, 0), np.float32)
        return VideoFeatures(
            video_id=video_id,
            image=image,
            image_times=np.arange(len(image), dtype=np.float64) / self.fps,
            audio=audio,
            text=text,
            title=title,
            labels=list(labels),
            duration_s=len(image) / self.fps,
        )


def open_source(
    path: str | Path,
    *,
    text_encoder_dir: str | Path | None = None,
    text_cache: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    progress: bool = True,
    infer: bool = False,
    need_encoder_states: bool = False,
) -> FeatureSource:
    """Open ``path`` as our feature store (has ``store.json``) or a MultimodalVideoTag folder (has
    ``class.txt``; FileNotFoundError for anything else), with a text encoder for the folder's titles.

    * A feature store already holds its text states: ``text_encoder_dir``, when given, must be the
      encoder that made them (same id), else ValueError.
    * A MultimodalVideoTag folder (``class.txt``): with ``text_encoder_dir`` its titles are encoded by
      that frozen encoder, cached under ``text_cache`` (default ``<folder>/.tagstream-cache/text-states``)
      per encoder id and split (model/title_cache.py), on ``device``, ``batch_size`` titles at a time.
      ``infer`` keeps label-less rows (MVT's inference lists). ``need_encoder_states`` (the model reads
      only the encoder branch) without ``text_encoder_dir`` is a ValueError saying what to pass.
    """
    from model.text import encoder_id

    root = Path(path)
    if (root / STORE).is_file():
        store = FeatureStore(root)
        if text_encoder_dir is not None:
            have, want = store.extractor_ids.get("text"), encoder_id(text_encoder_dir)
            if have != want:
                raise InputError(f"{root} holds text states from {have!r}, not from --text-encoder-dir ({want!r}); "
                                 "a feature store's text states are fixed when it is extracted")
        return store
    if not (root / "class.txt").is_file():
        raise FileNotFoundError(f"{root}: neither a feature store ({STORE}) nor a MultimodalVideoTag folder (class.txt)")
    if text_encoder_dir is None:
        if need_encoder_states:
            raise InputError(f"{root} is a MultimodalVideoTag folder: it has titles but no text-encoder states; "
                             "pass --text-encoder-dir DIR (a BERT-family model such as ERNIE 1.0) to encode them, "
                             "or use --text-branch chars")
        return MVTDataset(root, infer=infer)
    cache = TitleEncoderCache(text_encoder_dir, Path(text_cache) if text_cache else root / DEFAULT_DIR,
                              device=device, batch_size=batch_size, progress=progress)
    return MVTDataset(root, infer=infer, text_cache=cache)
