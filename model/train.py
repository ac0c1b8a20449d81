"""``tagstream train FEATURES OUT_CKPT``: train the fusion model (the paper's schedule, made precise).

FEATURES is our feature store or a MultimodalVideoTag folder (model/mvt_data.py:open_source);
its split column / list files give train, val and test. On a MultimodalVideoTag folder,
``--text-encoder-dir DIR`` (a local BERT-family transformers directory, e.g. ERNIE 1.0) encodes the
titles with that frozen encoder, cached per split and encoder (model/title_cache.py, ``--text-cache``),
and the encoder TextCNN trains on its token states, as MVT does; the checkpoint records the encoder's
id (model/mvt_data.py:open_source).

Schedule (paper section 3.2 and MVT's conf.txt): learning rate 7e-4, 30 epochs, x0.2 at epochs
5/10/15/20, batch 64, dropout 0.5, L2 8e-4. Optimizer: **centred RMSProp**, as MVT (``fluid.optimizer.RMSProp
(centered=True)`` with an ``L2Decay`` regulariser); L2 is applied as RMSProp's ``weight_decay`` (the L2
gradient is added before the adaptive scaling, as Paddle's regulariser does). ``--optimizer adamw`` is
offered as an alternative. The warm-up the paper mentions was configured in MVT but never used; there is
none here.

Training parity with MVT, and where the defaults differ from it (``--preset mvt`` removes the differences):

* **Loss reduction.** MVT sums the sigmoid cross-entropy over the batch and the classes
  (``reduce_sum`` twice); ``--loss-reduction mean`` (the default) averages it. The L2 term is not
  reduced, so the reduction changes the weight of L2 *relative to the data term*: the mean loss is the
  sum divided by B x C (batch x classes), hence **with mean reduction MVT's L2 coefficient l2 corresponds
  to l2 / (B x C); with sum reduction it is the same number as MVT's**. The default (mean, 8e-4) is thus
  B x C times stronger than MVT's 8e-4 (x1,856 with 64 videos and our 29 labels, x7,040 on MVT's 110).
  RMSProp divides the gradient by its running RMS, so scaling the whole gradient changes nothing but
  the epsilon's share: sum with l2 and mean with l2 / (B x C) train (nearly) the same model; only a
  partial last batch (B smaller) weighs L2 differently. ``history.json``'s ``train_loss`` is the mean
  per video and label in both cases.
* **RMSProp.** Paddle's RMSProp: ``r = rho r + (1 - rho) g^2``, ``m = rho m + (1 - rho) g`` (centred),
  ``w -= lr g / sqrt(r - m^2 + eps)``, rho 0.95, eps 1e-6, momentum 0 (the defaults MVT leaves alone).
  torch's ``RMSprop`` maps rho to ``alpha`` and has ``centered`` and ``momentum`` alike, but adds eps
  *outside* the square root (``sqrt(r - m^2) + eps``): no torch eps reproduces Paddle's floor of
  sqrt(1e-6) = 1e-3 on the denominator, which matters for parameters with tiny or constant gradients
  (e.g. L2 alone, where the centred variance goes to 0). ``--optimizer paddle-rmsprop`` is Paddle's
  update exactly (:class:`PaddleRMSProp`); ``--optimizer rmsprop`` is torch's with ``--rho`` as alpha
  and ``--eps`` (defaults 0.99 and 1e-8, torch's own, as earlier Tagstream versions trained).
* **Schedule in samples.** MVT's piecewise decay puts its boundaries at ``e x num_samples / batch``
  optimiser steps for e in decay_epochs, with num_samples = 70,000 from its config whatever the data
  set's size: its x0.2 steps come after 5,469 / 10,938 / 16,407 / 21,875 steps of 64 videos.
  ``--schedule-samples N`` does the same (the learning rate of optimiser step s, counted from 0, is
  ``lr x gamma^k`` with k the number of milestones e with ``s >= e x N / batch``); 0 (the default) counts
  the milestones in real epochs over our training set, which on 1,400 videos (22 steps per epoch) decays
  ~50 times earlier in steps than MVT. Epochs (``--epochs``, validation, early stopping) stay real passes
  over the training set, as in MVT, whose 30 epochs on a small set never reach its first boundary.
* **Attention.** The default attention adds a bilinear text term to MVT's additive form;
  ``--no-bilinear`` gives MVT's form (model/fusion.py).

``--preset mvt`` sets all of these at once: loss sum, L2 8e-4, ``paddle-rmsprop`` with rho 0.95 and eps
1e-6, lr 7e-4, batch 64, milestones 5/10/15/20 x0.2 in units of 70,000 samples, 30 epochs, patience 15,
dropout 0.5, no bilinear term, no title dropout (:data:`PRESETS`). Options are applied in command-line
order, so **an explicit flag given after ``--preset`` wins** and one given before it is overwritten.
``--train-videos N`` trains on a fixed subset of N training videos (drawn with seed 0, whatever
``--seed``), to see how the recipe behaves on a smaller set.

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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from model.chars import CharVocab
from model.checkpoint import LoadedCheckpoint, save_checkpoint
from model.collate import collate
from model.errors import InputError
from model.feature_store import FeatureSource
from model.features import VideoFeatures
from model.fusion import FusionConfig, FusionModel
from model.metrics import gap_at_k, hit_at_k
from model.mvt_data import open_source
from model.predict import Tagger, resolve_device
from model.progress import Progress

log = logging.getLogger(__name__)

STATE = "train_state.pt"
HISTORY = "history.json"
CURVES = "learning_curves.png"
#: options that must not change when a run is resumed
_FIXED = ("modalities", "seed", "title_dropout", "batch_size", "lr", "weight_decay", "optimizer", "milestones",
          "gamma", "image_hidden", "audio_hidden", "text_filters", "text_branch", "char_dim", "dropout", "bilinear",
          "loss_reduction", "rho", "eps", "schedule_samples", "train_videos")


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
    loss_reduction: str = "mean"
    rho: float = 0.99
    eps: float = 1e-8
    schedule_samples: int = 0
    train_videos: int = 0
    device: str = "auto"
    progress: bool = True
    restart: bool = False
    cache_mb: int = 2048
    threads: int = 0
    text_encoder_dir: str | None = None
    text_cache: str | None = None


#: ``--preset NAME``: option values set together (see the module docstring); flags after it still win
PRESETS: dict[str, dict[str, object]] = {
    "mvt": {"loss_reduction": "sum", "weight_decay": 8e-4, "optimizer": "paddle-rmsprop", "rho": 0.95, "eps": 1e-6,
            "lr": 7e-4, "batch_size": 64, "milestones": (5, 10, 15, 20), "gamma": 0.2, "schedule_samples": 70_000,
            "epochs": 30, "patience": 15, "dropout": 0.5, "bilinear": False, "title_dropout": 0.0},
}


class PaddleRMSProp(torch.optim.Optimizer):
    """Paddle's (fluid) RMSProp update, exactly: for each parameter w with gradient g (plus ``weight_decay``
    x w, Paddle's ``L2Decay`` regulariser), ``r = rho r + (1 - rho) g^2``; centred: ``m = rho m + (1 - rho) g``
    and ``w -= lr g / sqrt(r - m^2 + eps)``; else ``w -= lr g / sqrt(r + eps)``. r and m start at 0;
    no momentum (MVT's setting). Differs from ``torch.optim.RMSprop`` only in where eps goes."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, rho: float = 0.95, eps: float = 1e-6, weight_decay: float = 0.0,
                 centered: bool = True) -> None:
        super().__init__(params, {"lr": lr, "rho": rho, "eps": eps, "weight_decay": weight_decay, "centered": centered})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            rho, eps = group["rho"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                state = self.state[p]
                if not state:
                    state["square_avg"] = torch.zeros_like(p)
                    state["grad_avg"] = torch.zeros_like(p)
                square_avg, grad_avg = state["square_avg"], state["grad_avg"]
                square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
                denom = square_avg + eps
                if group["centered"]:
                    grad_avg.mul_(rho).add_(grad, alpha=1 - rho)
                    denom = denom - grad_avg * grad_avg
                p.addcdiv_(grad, denom.sqrt(), value=-group["lr"])
        return loss


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
        return torch.optim.RMSprop(model.parameters(), lr=opts.lr, alpha=opts.rho, eps=opts.eps,
                                   weight_decay=opts.weight_decay, centered=True)
    if opts.optimizer == "paddle-rmsprop":
        return PaddleRMSProp(model.parameters(), lr=opts.lr, rho=opts.rho, eps=opts.eps,
                             weight_decay=opts.weight_decay, centered=True)
    if opts.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    raise ValueError(f"unknown optimizer {opts.optimizer!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, opts: TrainOptions) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule. ``schedule_samples`` 0: x``gamma`` at each milestone epoch (stepped once
    per epoch). Otherwise stepped once per optimiser step: step s (from 0) runs at ``lr x gamma^k``, k the
    number of milestones e with ``s >= e x schedule_samples / batch_size`` (MVT's piecewise decay)."""
    if opts.schedule_samples <= 0:
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(opts.milestones), gamma=opts.gamma)
    boundaries = [e * opts.schedule_samples / opts.batch_size for e in opts.milestones]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: opts.gamma ** sum(step >= b for b in boundaries))


def loss_function(opts: TrainOptions) -> torch.nn.Module:
    """Sigmoid cross-entropy over every (video, label) of a batch: summed (MVT) or averaged."""
    if opts.loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', not {opts.loss_reduction!r}")
    return torch.nn.BCEWithLogitsLoss(reduction=opts.loss_reduction)


def mvt_equivalent_l2(opts: TrainOptions, num_labels: int) -> float:
    """The L2 coefficient that weighs as much against MVT's summed loss as ``weight_decay`` does against
    ours: ``weight_decay x batch x labels`` with mean reduction, ``weight_decay`` with sum."""
    return opts.weight_decay * (opts.batch_size * num_labels if opts.loss_reduction == "mean" else 1)


def training_subset(train_ids: list[str], n: int) -> list[str]:
    """``n`` of the training ids, drawn with a fixed seed (0) and kept in their order; all when n <= 0
    or n >= their number."""
    if n <= 0 or n >= len(train_ids):
        return train_ids
    keep = set(np.random.default_rng(0).choice(len(train_ids), size=n, replace=False).tolist())
    return [v for i, v in enumerate(train_ids) if i in keep]


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
    train_ids = training_subset(source.split_ids("train"), opts.train_videos)
    val_ids = source.split_ids("val")
    if not train_ids:
        raise InputError("no training videos (split 'train')")
    if not val_ids:
        log.warning("no 'val' split: validating on the training set (early stopping is then meaningless)")
        val_ids = train_ids
    cache = _VideoCache(source, opts.cache_mb)
    fixed = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items() if k in _FIXED}
    fixed["labels_hash"] = source.labels.hash()
    if opts.text_encoder_dir is not None:  # titles encoded here: another encoder must not continue the run
        fixed["text_extractor"] = (source.extractors.get("text") or {}).get("id")

    state_path = out / STATE
    state = None
    if state_path.is_file() and not opts.restart:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["fixed"] != fixed:
            raise InputError(f"{state_path} was made with other options {state['fixed']}; use --restart")
    chars = None
    uses_chars = "text" in opts.modalities and opts.text_branch in ("both", "chars")
    if state is not None and state["chars"] is not None:
        chars = CharVocab.from_dict(state["chars"])
    elif uses_chars:
        chars = CharVocab.build(cache.get(v).title for v in train_ids)
    model = build_model(source, opts, chars).to(device)
    optimizer = _optimizer(model, opts)
    scheduler = build_scheduler(optimizer, opts)
    per_step_schedule = opts.schedule_samples > 0
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
    loss_fn = loss_function(opts)
    log.info("%d training videos; L2 %g with %s reduction = MVT-equivalent L2 %g", len(train_ids),
             opts.weight_decay, opts.loss_reduction, mvt_equivalent_l2(opts, len(source.labels)))
    use_title_dropout = opts.title_dropout > 0 and "text" in opts.modalities

    for epoch in range(start_epoch, opts.epochs):
        if stopped:
            break
        model.train()
        gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + epoch)
        order = torch.randperm(len(train_ids), generator=gen).tolist()
        batches = [order[i : i + opts.batch_size] for i in range(0, len(order), opts.batch_size)]
        total, count = 0.0, 0
        lr = optimizer.param_groups[0]["lr"]  # the epoch's first step (a per-step schedule may lower it within)
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
            if per_step_schedule:
                scheduler.step()
            mean_loss = float(loss.detach()) / (batch.labels.numel() if opts.loss_reduction == "sum" else 1)
            total += mean_loss * len(idx)
            count += len(idx)
            bar.set_postfix(loss=f"{total / count:.4f}")
        if not per_step_schedule:
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


class _PresetAction(argparse.Action):
    """``--preset NAME`` sets the preset's values on the namespace when it is met, so flags after it win."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        for key, value in PRESETS[str(values)].items():
            setattr(namespace, key, value)


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
    parser.add_argument("--preset", choices=sorted(PRESETS), action=_PresetAction,
                        help="set a recipe's options at once (mvt: MultimodalVideoTag's loss, L2, RMSProp, "
                             "schedule in samples, no bilinear term, no title dropout); flags after it win")
    parser.add_argument("--optimizer", choices=["rmsprop", "paddle-rmsprop", "adamw"], default=d.optimizer,
                        help="rmsprop: torch's centred RMSprop; paddle-rmsprop: Paddle's (eps inside the sqrt)")
    parser.add_argument("--rho", type=float, default=d.rho, help="RMSProp's squared-gradient decay (torch's alpha)")
    parser.add_argument("--eps", type=float, default=d.eps, help="RMSProp's epsilon")
    parser.add_argument("--loss-reduction", choices=["mean", "sum"], default=d.loss_reduction,
                        help="sigmoid cross-entropy averaged or summed (MVT) over videos and labels; with mean, "
                             "MVT's L2 l2 corresponds to --weight-decay l2/(batch x labels)")
    parser.add_argument("--schedule-samples", type=int, default=d.schedule_samples,
                        help="count the milestones in units of N samples (optimiser steps of --batch-size), "
                             "as MVT's num_samples; 0: in real epochs")
    parser.add_argument("--train-videos", type=int, default=d.train_videos,
                        help="train on a fixed subset of N training videos (0: all)")
    parser.add_argument("--milestones", type=_csv_ints, default=d.milestones, help="lr decay epochs, e.g. 5,10,15,20")
    parser.add_argument("--gamma", type=float, default=d.gamma, help="lr factor at each milestone")
    parser.add_argument("--patience", type=int, default=d.patience, help="early stop after N epochs without a better val Hit@1")
    parser.add_argument("--image-hidden", type=int, default=d.image_hidden)
    parser.add_argument("--audio-hidden", type=int, default=d.audio_hidden)
    parser.add_argument("--text-filters", type=int, default=d.text_filters)
    parser.add_argument("--text-branch", choices=["both", "encoder", "chars"], default=d.text_branch)
    parser.add_argument("--text-encoder-dir", default=None,
                        help="MultimodalVideoTag folder: local BERT-family transformers dir (e.g. ERNIE 1.0); "
                             "its frozen token states of the titles feed the encoder TextCNN")
    parser.add_argument("--text-cache", default=None,
                        help="where encoded titles are cached (default: FEATURES/.tagstream-cache/text-states)")
    parser.add_argument("--char-dim", type=int, default=d.char_dim)
    parser.add_argument("--dropout", type=float, default=d.dropout)
    parser.add_argument("--no-bilinear", dest="bilinear", action="store_false",
                        help="drop the bilinear text term: MVT's additive attention exactly")
    parser.add_argument("--bilinear", dest="bilinear", action="store_true",
                        help="keep the bilinear text term (the default; undoes an earlier --no-bilinear or --preset mvt)")
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
    source = open_source(args.features, text_encoder_dir=opts.text_encoder_dir, text_cache=opts.text_cache,
                         device=opts.device, progress=opts.progress,
                         need_encoder_states="text" in opts.modalities and opts.text_branch == "encoder")
    summary = train(source, args.out_ckpt, opts)
    print(json.dumps(summary, ensure_ascii=False))
    return 0
