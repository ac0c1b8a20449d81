"""``tagstream predict CHECKPOINT INPUT --out FILE``: tag every video of INPUT with a checkpoint.

INPUT is a feature store, a MultimodalVideoTag feature folder (:mod:`model.batch_predict` does those), or a
folder of raw videos described by ``{train,val,test}.tsv`` lists (or one such ``.tsv`` file): those videos
first go through ``tagstream extract`` (:func:`worker.tools.extract.extract`, the worker's own decoder and
extractors) into a feature store, by default ``<FILE>.features/`` beside the output, and are then tagged
from it. Both steps are resumable, so a rerun with the same ``--out`` extracts and tags only what is new.
The extractors are the configured ones (``--image-arch``, ``--device``, ``--text-encoder-dir`` ...); a
checkpoint trained on others is refused after extraction, as for any feature store (exit status 2).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from model import batch_predict
from model.checkpoint import CONFIG
from worker.config import add_settings_arguments, settings_from_args
from worker.tools.extract import SPLITS, extract

log = logging.getLogger(__name__)

# extract's settings, less those batch_predict already has a flag for (--device, --text-encoder-dir, --log-level)
_SETTINGS = [
    "image_arch", "image_weights", "vggish_weights", "vggish_pca", "fps", "max_frames", "max_duration_s",
    "max_pixels", "decode_budget_s", "hwaccel", "decode_threads", "concurrency", "image_batch_size",
    "audio_batch_size", "text_batch_size", "batch_max_wait_s",
]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    batch_predict.add_arguments(parser)
    parser.add_argument("--features", type=Path, default=None,
                        help="folder of raw videos: the feature store they are extracted into "
                             "(default: FILE.features beside --out)")  # fmt: skip
    add_settings_arguments(parser, _SETTINGS)


def extract_videos(args: argparse.Namespace) -> Path:
    """Extract the raw videos of ``args.input`` into the feature store :func:`run` then tags; returns it."""
    source = Path(args.input)
    data_dir, splits = (source.parent, (source.stem,)) if source.is_file() else (source, SPLITS)
    if args.split:
        splits = tuple(s for s in splits if s == args.split)
    store = args.features or Path(args.out).with_name(Path(args.out).name + ".features")
    settings = settings_from_args(args, device=args.device, text_encoder_dir=args.text_encoder_dir)
    summary = extract(data_dir, store, splits=splits, settings=settings, progress=args.progress)
    log.info("predict: extracted %s into %s", summary.to_dict(), store)
    return store


def run(args: argparse.Namespace) -> int:
    """:func:`model.batch_predict.run`, after extracting a folder of raw videos (see the module docstring)."""
    if batch_predict.input_kind(args.input) == "videos":
        if not (Path(args.checkpoint) / CONFIG).is_file():  # before minutes of extraction
            raise FileNotFoundError(f"{args.checkpoint} is not a checkpoint directory (no {CONFIG})")
        args.input = str(extract_videos(args))
    return batch_predict.run(args)
