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
