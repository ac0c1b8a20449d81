"""``tagstream evaluate CKPT FEATURES [--split SPLIT] [--no-title]``: metrics of a checkpoint on a split.

Prints one JSON object: ``hit_at_1``, ``hit_at_2``, ``hit_at_3``, ``hit_at_5`` (a hit if any true label
is in the top k), ``gap_at_20`` (YouTube-8M GAP), ``map``, ``per_class_ap`` (label -> AP, null for a
class without positives in the split), plus ``level1_hit_at_1`` (top level-1 category, scored as the
max over its children, is one of the video's true level-1 categories), ``videos``, ``split``,
``no_title``, ``model_version``, ``split_fallback_from`` and ``report``. All metrics are fractions in
[0, 1] (model/metrics.py).

Split: ``--split`` given: that split (no videos in it: an error naming the splits there are, exit
status 1). Not given: ``test``; a folder without a ``test`` split (MVT's folders often have only
train and val) is evaluated on ``val`` instead, with a warning in the log, ``"split": "val"`` and
``"split_fallback_from": "test"`` in the JSON (null when no fallback happened).

``--no-title`` scores every video as if it had no title (the title-dropout experiment). The features'
extractor ids must match the checkpoint's (else exit status 2). The per-class report (TSV: label,
positives, AP, top-1 predictions, top-1 correct) goes to ``--report`` or, by default,
``CKPT/eval_<split>[_notitle].tsv``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from model.checkpoint import CheckpointMismatchError, load_checkpoint
from model.errors import InputError
from model.feature_store import FeatureSource
from model.metrics import evaluate_scores, hit_at_k
from model.mvt_data import open_source
from model.predict import Tagger, resolve_device

log = logging.getLogger(__name__)

DEFAULT_SPLIT = "test"
FALLBACK_SPLIT = "val"


class SplitNotFoundError(InputError):
    """The split to evaluate has no videos in the data set."""


def choose_split(source: FeatureSource, split: str | None) -> tuple[str, str | None]:
    """``(split to evaluate, split it replaces or None)``. ``split`` None means :data:`DEFAULT_SPLIT`,
    or :data:`FALLBACK_SPLIT` when the data has no default split; :class:`SplitNotFoundError` when
    the chosen split is empty."""
    counts = source.splits()
    if split is None:
        if counts.get(DEFAULT_SPLIT) or not counts.get(FALLBACK_SPLIT):
            split = DEFAULT_SPLIT
        else:
            log.warning("no %r split in the data (splits: %s): evaluating %r instead",
                        DEFAULT_SPLIT, counts, FALLBACK_SPLIT)
            return FALLBACK_SPLIT, DEFAULT_SPLIT
    if not counts.get(split):
        raise SplitNotFoundError(f"no videos in split {split!r} (splits: {counts})")
    return split, None


def evaluate(
    ckpt_dir: str | Path,
    source: FeatureSource,
    *,
    split: str | None = None,
    no_title: bool = False,
    device: str = "auto",
    batch_size: int = 64,
    report: str | Path | None = None,
) -> dict:
    """Metrics of the checkpoint in ``ckpt_dir`` on one split of ``source`` (which split: see
    :func:`choose_split`), as the JSON object described in the module docstring; the per-class TSV
    report goes to ``report`` (default ``CKPT/eval_<split>[_notitle].tsv``, the evaluated split)."""
    expected = {name: (info or {}).get("id") for name, info in source.extractors.items()}
    split, fallback_from = choose_split(source, split)
    ckpt = load_checkpoint(ckpt_dir, device=resolve_device(device), expected_extractors=expected)
    ids = source.split_ids(split)
    videos = [source.load(v) for v in ids]
    unknown = {label for v in videos for label in v.labels if label not in ckpt.labels.index}
    if unknown:
        log.warning("%d labels of the data are not in the checkpoint and are ignored: %s",
                    len(unknown), sorted(unknown)[:10])
    tagger = Tagger(ckpt, device=device, batch_size=batch_size)
    scores = tagger.scores(videos, no_title=no_title).astype(np.float64)
    truth = np.stack([ckpt.labels.encode(v.labels) for v in videos])
    result = evaluate_scores(scores, truth, ckpt.labels.labels)
    parent = ckpt.labels.parent
    truth1 = np.zeros((len(videos), len(ckpt.labels.level1)))
    for c in range(truth.shape[1]):
        if parent[c] >= 0:  # -1: an unused output, in no level-1 category
            truth1[:, parent[c]] = np.maximum(truth1[:, parent[c]], truth[:, c])
    result["level1_hit_at_1"] = hit_at_k(ckpt.labels.level1_scores(scores), truth1, 1)
    result.update(split=split, split_fallback_from=fallback_from, no_title=no_title, model_version=ckpt.version)

    path = Path(report) if report else Path(ckpt_dir) / f"eval_{split}{'_notitle' if no_title else ''}.tsv"
    top1 = scores.argmax(axis=1)
    lines = ["label\tpositives\tap\ttop1_predicted\ttop1_correct"]
    for c, label in enumerate(ckpt.labels.labels):
        ap = result["per_class_ap"][label]
        predicted = top1 == c
        lines.append(f"{label}\t{int(truth[:, c].sum())}\t{'' if ap is None else f'{ap:.4f}'}\t"
                     f"{int(predicted.sum())}\t{int((predicted & (truth[:, c] > 0)).sum())}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result["report"] = str(path)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", help="checkpoint directory")
    parser.add_argument("features", help="feature store dir or MultimodalVideoTag folder")
    parser.add_argument("--split", default=None,
                        help=f"split to evaluate (default: {DEFAULT_SPLIT}, or {FALLBACK_SPLIT} when there is no {DEFAULT_SPLIT})")
    parser.add_argument("--no-title", action="store_true", help="score every video as if it had no title")
    parser.add_argument("--report", default=None, help="per-class TSV report path (default: next to CKPT)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--text-encoder-dir", default=None,
                        help="MultimodalVideoTag folder: encode its titles with this frozen encoder (the one the "
                             "checkpoint was trained with; cached like train's)")
    parser.add_argument("--text-cache", default=None, help="where encoded titles are cached (default: in the folder)")
    parser.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    try:
        source = open_source(args.features, text_encoder_dir=args.text_encoder_dir, text_cache=args.text_cache,
                             device=args.device, batch_size=args.batch_size)
        result = evaluate(args.ckpt, source, split=args.split, no_title=args.no_title,
                          device=args.device, batch_size=args.batch_size, report=args.report)
    except CheckpointMismatchError as exc:
        log.error("%s", exc)
        return 2
    except SplitNotFoundError as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(result, ensure_ascii=False))
    return 0
