"""``tagstream train`` / ``tagstream evaluate`` end to end on a tiny feature store: checkpoint,
evaluation JSON and report, training learns (beats a label-shuffled control), resume equals
uninterrupted training, same seed -> same weights."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.feature_store import FeatureStoreWriter
from model.features import VideoFeatures
from worker.cli import main

LABELS = ["动物-猫", "动物-狗", "游戏-射击", "游戏-赛车"]
WORDS = {"动物-猫": "猫咪", "动物-狗": "小狗", "游戏-射击": "枪战", "游戏-赛车": "飙车"}
EXTRACTORS = {"image": {"id": "img-test", "dim": 12}, "audio": {"id": "aud-test", "dim": 128},
              "text": {"id": "txt-test", "dim": 6}}
SMALL = ["--image-hidden", "8", "--audio-hidden", "4", "--text-filters", "6", "--char-dim", "6",
         "--batch-size", "8", "--lr", "3e-3", "--no-progress", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_store(out, n=48, seed=0):
    """Image decides the level-1 group, audio the level-2 label, the title names it (80% of videos)."""
    rng = np.random.default_rng(seed)
    with FeatureStoreWriter(out, EXTRACTORS, {"fps": 1.0, "max_frames": 300}, labels=LABELS) as w:
        for i in range(n):
            c = i % 4
            t, ta = int(rng.integers(2, 7)), int(rng.integers(0, 5))
            image = rng.normal(size=(t, 12)).astype(np.float32)
            image[:, c // 2] += 2.0
            audio = rng.normal(size=(ta, 128)).astype(np.float32)
            audio[:, c % 2] += 1.5
            title = f"{WORDS[LABELS[c]]}视频" if rng.random() < 0.8 else ""
            text = rng.normal(size=(3 if title else 0, 6)).astype(np.float32)
            split = "train" if i < n * 0.6 else ("val" if i < n * 0.8 else "test")
            w.write(VideoFeatures(f"vid{i}", image, np.arange(t) + 0.5, audio, text, title, [LABELS[c]], float(t)), split)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store"))


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def state_weights(ckpt) -> dict[str, torch.Tensor]:
    return torch.load(ckpt / "train_state.pt", weights_only=True)["model"]


def test_train_then_evaluate(store, tmp_path, capsys):
    ckpt = tmp_path / "ck"
    assert main(["train", str(store), str(ckpt), "--epochs", "3", "--title-dropout", "0.4", *SMALL]) == 0
    summary = last_json(capsys)
    assert summary["epochs_run"] == 3 and 1 <= summary["best_epoch"] <= 3
    for name in ("model.safetensors", "config.json", "labels.txt", "chars.json", "learning_curves.png",
                 "history.json", "train_state.pt"):
        assert (ckpt / name).is_file(), name
    assert (ckpt / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((ckpt / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[-1]["train_loss"] < history[0]["train_loss"]

    assert main(["evaluate", str(ckpt), str(store), "--split", "test"]) == 0
    result = last_json(capsys)
    for key in ("hit_at_1", "hit_at_2", "hit_at_3", "hit_at_5", "gap_at_20", "map"):
        assert 0.0 <= result[key] <= 1.0, key
    assert set(result["per_class_ap"]) == set(LABELS)
    assert result["hit_at_1"] <= result["hit_at_2"] <= result["hit_at_3"] <= result["hit_at_5"]
    assert result["split"] == "test" and result["split_fallback_from"] is None
    assert result["videos"] == 9 and result["model_version"] == summary["version"]
    report = (ckpt / "eval_test.tsv").read_text("utf-8").splitlines()
    assert report[0].startswith("label\tpositives\tap") and len(report) == 1 + len(LABELS)

    assert main(["evaluate", str(ckpt), str(store), "--no-title", "--report", str(tmp_path / "r.tsv")]) == 0
    assert last_json(capsys)["no_title"] is True and (tmp_path / "r.tsv").is_file()


def shuffled_copy(store, out, seed=0):
    """``store`` with its labels permuted over the videos: the same features, no signal left."""
    out.mkdir()
    for name in ("store.json", "labels.txt", "videos"):
        src = store / name
        if src.is_dir():
            shutil.copytree(src, out / name)
        else:
            shutil.copy(src, out / name)
    rows = [json.loads(line) for line in (store / "manifest.jsonl").read_text("utf-8").splitlines()]
    labels = [row["labels"] for row in rows]
    random.Random(seed).shuffle(labels)
    (out / "manifest.jsonl").write_text(
        "".join(json.dumps({**row, "labels": lab}, ensure_ascii=False) + "\n" for row, lab in zip(rows, labels, strict=True)),
        encoding="utf-8")
    return out


def test_training_learns_what_the_labels_say(tmp_path, capsys):
    """Trained on a learnable set, Hit@1 and mAP on its test split beat the same training on the same
    features with shuffled labels (chance level: 1 of 4 labels) by a wide margin."""
    store = make_store(tmp_path / "store", n=64)
    fast = [*SMALL, "--epochs", "5", "--seed", "0"]
    fast[fast.index("--lr") + 1] = "1e-2"
    results = {}
    for name, data in (("real", store), ("shuffled", shuffled_copy(store, tmp_path / "shuffled"))):
        assert main(["train", str(data), str(tmp_path / name), *fast]) == 0
        assert main(["evaluate", str(tmp_path / name), str(store), "--split", "test"]) == 0
        results[name] = last_json(capsys)
    real, shuffled = results["real"], results["shuffled"]
    assert real["videos"] == shuffled["videos"] == 12
    assert real["hit_at_1"] >= 0.75, real
    assert real["hit_at_1"] >= shuffled["hit_at_1"] + 0.4, (real["hit_at_1"], shuffled["hit_at_1"])
    assert real["map"] >= shuffled["map"] + 0.3, (real["map"], shuffled["map"])
    assert real["level1_hit_at_1"] >= 0.75


def test_evaluate_refuses_features_from_other_extractors(store, tmp_path, capsys):
    ckpt = tmp_path / "ck"
    assert main(["train", str(store), str(ckpt), "--epochs", "1", "--modalities", "image,audio", *SMALL]) == 0
    capsys.readouterr()
    other = json.loads((store / "store.json").read_text())
    other["extractors"]["image"]["id"] = "resnet50"
    (tmp_path / "other").mkdir()
    for name in ("manifest.jsonl", "labels.txt"):
        (tmp_path / "other" / name).write_bytes((store / name).read_bytes())
    (tmp_path / "other" / "store.json").write_text(json.dumps(other))
    assert main(["evaluate", str(ckpt), str(tmp_path / "other")]) == 2
    assert "chars.json" not in {p.name for p in ckpt.iterdir()}  # image+audio: no text branch


def test_resume_continues_and_equals_uninterrupted_training(store, tmp_path, capsys):
    straight, resumed, again = tmp_path / "straight", tmp_path / "resumed", tmp_path / "again"
    assert main(["train", str(store), str(straight), "--epochs", "3", "--seed", "5", *SMALL]) == 0
    assert main(["train", str(store), str(resumed), "--epochs", "2", "--seed", "5", *SMALL]) == 0
    after_two = state_weights(resumed)
    # determinism: the same seed gives the same weights
    assert main(["train", str(store), str(again), "--epochs", "2", "--seed", "5", *SMALL]) == 0
    for name, tensor in state_weights(again).items():
        assert torch.equal(tensor, after_two[name]), name
    # re-running with more epochs continues after epoch 2 and ends where uninterrupted training ends
    assert main(["train", str(store), str(resumed), "--epochs", "3", "--seed", "5", *SMALL]) == 0
    history = json.loads((resumed / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    a, b = state_weights(straight), state_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_file(str(straight / "model.safetensors")).keys() == load_file(str(resumed / "model.safetensors")).keys()
    capsys.readouterr()
    # a different seed gives different weights; changed options refuse to resume
    with pytest.raises(ValueError, match="restart"):
        main(["train", str(store), str(again), "--epochs", "3", "--seed", "7", *SMALL])
    assert main(["train", str(store), str(again), "--epochs", "1", "--seed", "6", "--restart", *SMALL]) == 0
    assert main(["train", str(store), str(straight), "--epochs", "1", "--seed", "6", "--restart", *SMALL]) == 0
    assert all(torch.equal(t, state_weights(straight)[k]) for k, t in state_weights(again).items())
    assert main(["train", str(store), str(straight), "--epochs", "1", "--seed", "5", "--restart", *SMALL]) == 0
    assert any(not torch.equal(t, state_weights(straight)[k]) for k, t in state_weights(again).items())


# ---------------------------------------------------------------- training parity with MultimodalVideoTag

def test_sum_reduction_is_mean_times_batch_times_labels_on_the_same_batch(store):
    """The summed loss (MVT) is the mean loss x (batch x labels) on one real batch, gradients included."""
    from model.collate import collate
    from model.mvt_data import open_source
    from model.train import TrainOptions, build_model, loss_function

    source = open_source(str(store))
    videos = [source.load(v) for v in source.split_ids("train")[:8]]
    opts = TrainOptions(modalities=("image", "audio"), image_hidden=8, audio_hidden=4, dropout=0.0)
    torch.manual_seed(0)
    model = build_model(source, opts, None)
    dims = {"image": 12, "audio": 128, "text": 6}
    batch = collate(videos, labels=source.labels, chars=None, device=torch.device("cpu"), dims=dims)
    losses, grads = {}, {}
    for reduction in ("mean", "sum"):
        model.zero_grad()
        loss = loss_function(TrainOptions(loss_reduction=reduction))(model(batch).logits, batch.labels)
        loss.backward()
        losses[reduction] = float(loss.detach())
        grads[reduction] = model.head.weight.grad.clone()
    scale = batch.labels.numel()
    assert batch.labels.shape == (8, len(LABELS))
    assert losses["sum"] == pytest.approx(losses["mean"] * scale, rel=1e-6)
    assert torch.allclose(grads["sum"], grads["mean"] * scale, rtol=1e-5, atol=1e-8)


def test_mean_reduction_with_l2_over_batch_times_labels_trains_like_mvt_sum(tmp_path, capsys):
    """The docstring's equivalence: with Paddle's RMSProp (scale-invariant; eps made negligible), sum
    reduction with L2 l2 trains the same weights as mean reduction with l2 / (batch x labels), and not the
    same as mean reduction with l2 itself. 24 training videos in batches of 8, 4 labels: 8 x 4 = 32."""
    store = make_store(tmp_path / "store", n=40)
    common = [*SMALL, "--epochs", "2", "--seed", "3", "--optimizer", "paddle-rmsprop", "--eps", "1e-30"]
    runs = {"sum": ["--loss-reduction", "sum", "--weight-decay", "8e-4"],
            "mean_scaled": ["--loss-reduction", "mean", "--weight-decay", str(8e-4 / 32)],
            "mean_same": ["--loss-reduction", "mean", "--weight-decay", "8e-4"]}
    weights = {}
    for name, flags in runs.items():
        assert main(["train", str(store), str(tmp_path / name), *common, *flags]) == 0
        weights[name] = state_weights(tmp_path / name)
    capsys.readouterr()
    for key, tensor in weights["sum"].items():
        assert torch.allclose(tensor, weights["mean_scaled"][key], rtol=1e-4, atol=1e-6), key
    assert any(not torch.allclose(t, weights["mean_same"][k], rtol=1e-3, atol=1e-5) for k, t in weights["sum"].items())


def test_paddle_rmsprop_is_paddles_update():
    """Two steps by hand: r = rho r + (1-rho) g^2, m = rho m + (1-rho) g, w -= lr g / sqrt(r - m^2 + eps),
    g including L2 x w."""
    from model.train import PaddleRMSProp

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = PaddleRMSProp([w], lr=0.1, rho=0.9, eps=1e-2, weight_decay=0.5)
    ref, r, m = w.detach().clone(), torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for data_grad in (torch.tensor([0.3, 0.0], dtype=torch.float64), torch.tensor([-1.0, 2.0], dtype=torch.float64)):
        w.grad = data_grad.clone()
        opt.step()
        g = data_grad + 0.5 * ref
        r = 0.9 * r + 0.1 * g * g
        m = 0.9 * m + 0.1 * g
        ref = ref - 0.1 * g / torch.sqrt(r - m * m + 1e-2)
        assert torch.allclose(w.detach(), ref, rtol=0, atol=1e-12)


def test_preset_mvt_sets_every_field_and_later_flags_win(store, tmp_path, capsys):
    import argparse

    from model.train import PRESETS, TrainOptions, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    claimed = {"loss_reduction": "sum", "weight_decay": 8e-4, "optimizer": "paddle-rmsprop", "rho": 0.95,
               "eps": 1e-6, "schedule_samples": 70_000, "milestones": (5, 10, 15, 20), "gamma": 0.2,
               "batch_size": 64, "lr": 7e-4, "bilinear": False, "title_dropout": 0.0}
    assert claimed.items() <= PRESETS["mvt"].items()
    defaults = TrainOptions()
    changed = {k for k, v in claimed.items() if getattr(defaults, k) != v}
    assert changed == {"loss_reduction", "optimizer", "rho", "eps", "schedule_samples", "bilinear"}
    args = parser.parse_args(["F", "O", "--title-dropout", "0.4", "--preset", "mvt"])
    assert all(getattr(args, k) == v for k, v in PRESETS["mvt"].items())  # the preset overrides earlier flags
    args = parser.parse_args(["F", "O", "--preset", "mvt", "--weight-decay", "1e-3", "--schedule-samples", "7000",
                              "--loss-reduction", "mean"])
    assert (args.weight_decay, args.schedule_samples, args.loss_reduction) == (1e-3, 7000, "mean")
    assert all(getattr(args, k) == v for k, v in PRESETS["mvt"].items()
               if k not in ("weight_decay", "schedule_samples", "loss_reduction"))
    # end to end: the options a training records are the preset's, the later flags winning
    ckpt = tmp_path / "mvt"
    assert main(["train", str(store), str(ckpt), "--preset", "mvt", *SMALL, "--epochs", "1"]) == 0
    capsys.readouterr()
    fixed = torch.load(ckpt / "train_state.pt", weights_only=True)["fixed"]
    for key, value in PRESETS["mvt"].items():
        expected = list(value) if isinstance(value, tuple) else value
        if key not in ("batch_size", "lr", "epochs", "patience"):  # SMALL sets batch and lr after the preset
            assert fixed[key] == expected, key
    assert (fixed["batch_size"], fixed["lr"]) == (8, 3e-3)


def test_sample_schedule_decays_at_the_right_optimiser_steps():
    """schedule-samples 640, batch 64: 10 steps per schedule epoch, so x0.2 after 50, 100, 150, 200 steps."""
    from model.train import TrainOptions, build_scheduler

    opts = TrainOptions(lr=1.0, batch_size=64, schedule_samples=640, milestones=(5, 10, 15, 20), gamma=0.2)
    w = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([w], lr=opts.lr)
    scheduler = build_scheduler(optimizer, opts)
    used = []
    for _ in range(230):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.2 ** sum(s >= 10 * e for e in (5, 10, 15, 20)) for s in range(230)]
    assert used == pytest.approx(expected, rel=1e-9)
    assert [s for s in range(1, 230) if used[s] < used[s - 1] * 0.5] == [50, 100, 150, 200]
    # 0 keeps the per-epoch milestones
    per_epoch = build_scheduler(torch.optim.SGD([w], lr=1.0), TrainOptions(lr=1.0))
    assert isinstance(per_epoch, torch.optim.lr_scheduler.MultiStepLR)


def test_training_steps_the_sample_schedule_per_batch(tmp_path, capsys):
    """In ``train``: 24 videos in batches of 8 are 3 steps per epoch; --schedule-samples 16 makes a schedule
    epoch 2 steps, so milestones 1,2 decay before steps 2 and 4: epoch 2 starts (step 3) at lr x 0.2,
    epoch 3 (step 6) at lr x 0.04. ``--train-videos 16`` then gives 2 steps per epoch."""
    store = make_store(tmp_path / "store", n=40)
    flags = [*SMALL, "--epochs", "3", "--schedule-samples", "16", "--milestones", "1,2", "--gamma", "0.2"]
    assert main(["train", str(store), str(tmp_path / "a"), *flags]) == 0
    lrs = [h["lr"] for h in json.loads((tmp_path / "a" / "history.json").read_text())]
    assert lrs == pytest.approx([3e-3, 3e-3 * 0.2, 3e-3 * 0.04])
    assert main(["train", str(store), str(tmp_path / "b"), *flags, "--train-videos", "16"]) == 0
    lrs = [h["lr"] for h in json.loads((tmp_path / "b" / "history.json").read_text())]
    assert lrs == pytest.approx([3e-3, 3e-3 * 0.2, 3e-3 * 0.04])  # steps 0, 2, 4
    capsys.readouterr()
    from model.train import training_subset

    ids = [f"v{i}" for i in range(24)]
    assert training_subset(ids, 16) == training_subset(ids, 16) and len(training_subset(ids, 16)) == 16
    assert training_subset(ids, 0) == ids and training_subset(ids, 99) == ids
