"""``tagstream train FEATURES OUT_CKPT``: train the fusion model (the paper's schedule, made precise).

FEATURES is our feature store or a MultimodalVideoTag folder (model/feature_store.py:open_features);
its split column / list files give train, val and test.

Schedule (paper section 3.2 and MVT's conf.txt): learning rate 7e-4, 30 epochs, x0.2 at epochs
5/10/15/20 (counted in real epochs over our training set; MVT counted them from a configured sample
count), batch 64, dropout 0.5, L2 8e-4. Optimizer: **centred RMSProp**, as MVT (``fluid.optimizer.RMSProp
(centered=True)`` with an ``L2Decay`` regulariser); L2 is applied as RMSProp's ``weight_decay`` (the L2
gradient is added before the adaptive scaling, as Paddle's regulariser does). ``--optimizer adamw`` is
offered as an alternative. Loss: sigmoid cross-entropy **averaged** over labels and videos (MVT summed).
The warm-up the paper mentions was configured in MVT but never used; there is none here.

Validation every epoch (Hit@1/2, GAP@20, val loss); the best epoch by validation Hit@1 is written to
OUT_CKPT as a checkpoint (model/checkpoint.py). Early stop: after ``--patience`` epochs (default 15,
MVT's ``early_stop``) without a better validation Hit@1.

Resumable: after every epoch the full training state (model, optimizer, scheduler, RNG, history,
early-stop counters, character vocabulary) goes to ``OUT_CKPT/train_state.pt``; running the same command
again continues after the last finished epoch (a larger ``--epochs`` extends a finished run;
``--restart`` starts over). Resumed training is bit-identical to uninterrupted training: the shuffling
and title-dropout draws come from a generator seeded by (seed, epoch), dropout from torch's global
RNG, whose state is saved. ``history.json`` and ``learning_curves.png`` are rewritten every epoch.

Determinism: ``torch.manual_seed(seed)``, ``torch.use_deterministic_algorithms(True)`` (warn-only, so
an op without a deterministic kernel warns instead of failing), cuDNN deterministic, and
``CUBLAS_WORKSPACE_CONFIG`` set on GPU: the same seed on the same device gives the same weights.

Title dropout (``--title-dropout P``): in training each video's title is hidden with probability P
(the text vector is zeroed and the attention falls back to its learned query), so the model stays
useful for videos without titles. Off by default (0.0). This is our addition: MVT never drops a
modality (its reader always feeds the title); 0.4 is only the value scripts/reproduce_table1.py tries.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from model.chars import CharVocab
from model.checkpoint import LoadedCheckpoint, save_checkpoint
from model.collate import collate
from model.feature_store import FeatureSource, open_features
from model.features import VideoFeatures
from model.fusion import FusionConfig, FusionModel
from model.metrics import gap_at_k, hit_at_k
from model.predict import Tagger, resolve_device
from model.progress import Progress

log = logging.getLogger(__name__)

STATE = "train_state.pt"
HISTORY = "history.json"
CURVES = "learning_curves.png"
#: options that must not change when a run is resumed
_FIXED = ("modalities", "seed", "title_dropout", "batch_size", "lr", "weight_decay", "optimizer", "milestones",
          "gamma", "image_hidden", "audio_hidden", "text_filters", "text_branch", "char_dim", "dropout", "bilinear")


@dataclass
class TrainOptions:
    modalities: tuple[str, ...] = ("image", "audio", "text")
    epochs: int = 30
    seed: int = 0
    title_dropout: float = 0.0
    batch_size: int = 64
    lr: float = 7e-4
    weight_decay: float = 8e-4
    optimizer: str = "rmsprop"
    milestones: tuple[int, ...] = (5, 10, 15, 20)
    gamma: float = 0.2
    patience: int = 15
    image_hidden: int = 512
    audio_hidden: int = 128
    text_filters: int = 256
    text_branch: str = "both"
    char_dim: int = 128
    dropout: float = 0.5
    bilinear: bool = True
    device: str = "auto"
    progress: bool = True
    restart: bool = False
    cache_mb: int = 2048
    threads: int = 0


class _VideoCache:
    """Loads videos from the source, keeping them in memory up to a byte budget."""

    def __init__(self, source: FeatureSource, budget_mb: int) -> None:
        self.source, self.budget, self.used = source, budget_mb * 2**20, 0
        self.cache: dict[str, VideoFeatures] = {}

    def get(self, video_id: str) -> VideoFeatures:
        video = self.cache.get(video_id)
        if video is None:
            video = self.source.load(video_id)
            size = video.image.nbytes + video.audio.nbytes + video.text.nbytes
            if self.used + size <= self.budget:
                self.cache[video_id] = video
                self.used += size
        return video


def set_determinism(seed: int, device: torch.device) -> None:
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)


def build_model(source: FeatureSource, opts: TrainOptions, chars: CharVocab | None) -> FusionModel:
    dims = source.dims
    config = FusionConfig(
        image_dim=dims["image"], audio_dim=dims["audio"], text_dim=dims["text"], num_labels=len(source.labels),
        image_hidden=opts.image_hidden, audio_hidden=opts.audio_hidden, text_filters=opts.text_filters,
        modalities=tuple(opts.modalities), text_branch=opts.text_branch,
        char_vocab_size=len(chars) if chars is not None else 0, char_dim=opts.char_dim,
        bilinear=opts.bilinear, dropout=opts.dropout,
    )
    return FusionModel(config)


def _optimizer(model: torch.nn.Module, opts: TrainOptions) -> torch.optim.Optimizer:
    if opts.optimizer == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay, centered=True)
    if opts.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    raise ValueError(f"unknown optimizer {opts.optimizer!r}")


def validate(tagger: Tagger, videos: list[VideoFeatures]) -> dict:
    """Validation loss (mean sigmoid cross-entropy), Hit@1/2, GAP@20 of ``videos``."""
    probs = tagger.scores(videos).astype(np.float64)
    truth = np.stack([tagger.ckpt.labels.encode(v.labels) for v in videos])
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    loss = float(-(truth * np.log(p) + (1 - truth) * np.log(1 - p)).mean())
    return {"val_loss": loss, "val_hit_at_1": hit_at_k(probs, truth, 1), "val_hit_at_2": hit_at_k(probs, truth, 2),
            "val_gap_at_20": gap_at_k(probs, truth, 20)}


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="val loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("mean sigmoid cross-entropy")
    ax1.legend()
    ax2.plot(epochs, [h["val_hit_at_1"] for h in history], "o-", label="val Hit@1")
    ax2.plot(epochs, [h["val_hit_at_2"] for h in history], "o-", label="val Hit@2")
    ax2.plot(epochs, [h["val_gap_at_20"] for h in history], "o-", label="val GAP@20")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def train(source: FeatureSource, out_dir: str | Path, opts: TrainOptions) -> dict:
    """Train (or resume) into ``out_dir``; returns a summary (best epoch, its validation metrics, version)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(opts.device)
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    set_determinism(opts.seed, device)
    train_ids = source.split_ids("train")
    val_ids = source.split_ids("val")
    if not train_ids:
        raise ValueError("no training videos (split 'train')")
    if not val_ids:
        log.warning("no 'val' split: validating on the training set (early stopping is then meaningless)")
        val_ids = train_ids
    cache = _VideoCache(source, opts.cache_mb)
    fixed = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items() if k in _FIXED}
    fixed["labels_hash"] = source.labels.hash()

    state_path = out / STATE
    state = None
    if state_path.is_file() and not opts.restart:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["fixed"] != fixed:
            raise ValueError(f"{state_path} was made with other options {state['fixed']}; use --restart")
    chars = None
    uses_chars = "text" in opts.modalities and opts.text_branch in ("both", "chars")
    if state is not None and state["chars"] is not None:
        chars = CharVocab.from_dict(state["chars"])
    elif uses_chars:
        chars = CharVocab.build(cache.get(v).title for v in train_ids)
    model = build_model(source, opts, chars).to(device)
    optimizer = _optimizer(model, opts)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(opts.milestones), gamma=opts.gamma)
    history: list[dict] = []
    best = {"val_hit_at_1": -1.0, "epoch": 0}
    bad_epochs, start_epoch, stopped = 0, 0, False
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        history, best, bad_epochs = state["history"], state["best"], state["bad_epochs"]
        start_epoch, stopped = state["epoch"], state["stopped"]
        log.info("resuming %s after epoch %d", out, start_epoch)
    val_videos = [cache.get(v) for v in val_ids]
    dims = {"image": model.config.image_dim, "audio": model.config.audio_dim, "text": model.config.text_dim or 1}
    ckpt_view = LoadedCheckpoint(model, model.config, source.labels, chars, source.extractors, source.sampling, "training")
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="mean")
    use_title_dropout = opts.title_dropout > 0 and "text" in opts.modalities

    for epoch in range(start_epoch, opts.epochs):
        if stopped:
            break
        model.train()
        gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + epoch)
        order = torch.randperm(len(train_ids), generator=gen).tolist()
        batches = [order[i : i + opts.batch_size] for i in range(0, len(order), opts.batch_size)]
        total, count = 0.0, 0
        # a bar on a terminal, else a log line every 10 s; the epoch's summary line follows either way
        bar = Progress(len(batches), f"epoch {epoch + 1}/{opts.epochs}", unit="batch", enabled=opts.progress,
                       logger=log, leave=False)  # fmt: skip
        for idx in bar.iterate(batches):
            videos = [cache.get(train_ids[i]) for i in idx]
            batch = collate(videos, labels=source.labels, chars=chars, device=device, dims=dims)
            drop = torch.rand(len(idx), generator=gen) < opts.title_dropout
            if use_title_dropout:
                batch.has_title = batch.has_title & ~drop.to(device)
            loss = loss_fn(model(batch).logits, batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            bar.set_postfix(loss=f"{total / count:.4f}")
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics = validate(Tagger(ckpt_view, device=device, batch_size=opts.batch_size), val_videos)
        model.train()
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": total / max(count, 1), **metrics}
        history.append(row)
        improved = metrics["val_hit_at_1"] > best["val_hit_at_1"]
        if improved:
            best = {"epoch": epoch + 1, **metrics}
            save_checkpoint(out, model, labels=source.labels, chars=chars, extractors=source.extractors,
                            sampling=source.sampling, extra={"trained": {**best, "options": fixed}})
            bad_epochs = 0
        else:
            bad_epochs += 1
        stopped = bad_epochs >= opts.patience
        log.info("epoch %d: train loss %.4f, val loss %.4f, val Hit@1 %.4f%s%s", epoch + 1, row["train_loss"],
                 metrics["val_loss"], metrics["val_hit_at_1"], " (best)" if improved else "",
                 " - early stop" if stopped else "")
        torch.save({
            "fixed": fixed, "epoch": epoch + 1, "stopped": stopped, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "history": history, "best": best, "bad_epochs": bad_epochs,
            "chars": chars.to_dict() if chars is not None else None,
        }, out / (STATE + ".tmp"))
        os.replace(out / (STATE + ".tmp"), out / STATE)
        (out / HISTORY).write_text(json.dumps(history, indent=1), encoding="utf-8")
        plot_curves(history, out / CURVES)
    version = json.loads((out / "config.json").read_text("utf-8"))["version"]
    return {"best_epoch": best["epoch"], "best": best, "epochs_run": len(history), "stopped_early": stopped,
            "version": version, "checkpoint": str(out)}


def _csv_ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainOptions()
    parser.add_argument("features", help="feature store dir or MultimodalVideoTag folder")
    parser.add_argument("out_ckpt", help="checkpoint directory to write (and resume from)")
    parser.add_argument("--modalities", default=",".join(d.modalities), help="comma-separated: image,audio,text")
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--title-dropout", type=float, default=d.title_dropout)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 coefficient")
    parser.add_argument("--optimizer", choices=["rmsprop", "adamw"], default=d.optimizer)
    parser.add_argument("--milestones", type=_csv_ints, default=d.milestones, help="lr decay epochs, e.g. 5,10,15,20")
    parser.add_argument("--gamma", type=float, default=d.gamma, help="lr factor at each milestone")
    parser.add_argument("--patience", type=int, default=d.patience, help="early stop after N epochs without a better val Hit@1")
    parser.add_argument("--image-hidden", type=int, default=d.image_hidden)
    parser.add_argument("--audio-hidden", type=int, default=d.audio_hidden)
    parser.add_argument("--text-filters", type=int, default=d.text_filters)
    parser.add_argument("--text-branch", choices=["both", "encoder", "chars"], default=d.text_branch)
    parser.add_argument("--char-dim", type=int, default=d.char_dim)
    parser.add_argument("--dropout", type=float, default=d.dropout)
    parser.add_argument("--no-bilinear", dest="bilinear", action="store_false", help="drop the paper's bilinear query term")
    parser.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (on a terminal) or progress log lines (otherwise)")
    parser.add_argument("--restart", action="store_true", help="ignore a saved training state")
    parser.add_argument("--cache-mb", type=int, default=d.cache_mb, help="keep up to this many MB of features in memory")
    parser.add_argument("--threads", type=int, default=d.threads,
                        help="torch CPU threads (0: torch's default; 1 is fastest for small models on busy machines)")
    parser.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    opts = TrainOptions(
        modalities=tuple(m.strip() for m in args.modalities.split(",") if m.strip()),
        **{k: getattr(args, k) for k in TrainOptions.__dataclass_fields__ if k != "modalities" and hasattr(args, k)},
    )
    summary = train(open_features(args.features), args.out_ckpt, opts)
    print(json.dumps(summary, ensure_ascii=False))
    return 0
