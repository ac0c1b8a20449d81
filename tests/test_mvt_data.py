"""MultimodalVideoTag's own format: a small set written exactly that way loads and trains."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from model.feature_store import open_features
from model.mvt_data import MVTDataset
from model.train import TrainOptions, train

CLASSES = ["拍人-帅哥", "拍人-秀特效", "美食-烘焙", "游戏-射击"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_mvt(root, n=16, image_dim=32):
    """class.txt, train/val/test .txt TSVs and feature_files/<stem>.pkl, as MVT's datasets/ folder."""
    rng = np.random.default_rng(0)
    (root / "feature_files").mkdir(parents=True)
    (root / "class.txt").write_text("".join(c + "\n" for c in CLASSES), encoding="utf-8")
    lines = {"train": [], "val": [], "test": []}
    for i in range(n):
        c = i % len(CLASSES)
        url = f"http://example.com/videos/{i:04d}.mp4"
        image = rng.normal(size=(int(rng.integers(3, 9)), image_dim)).astype(np.float32)
        image[:, c] += 3
        audio = np.zeros((0, 128), np.float32) if i % 5 == 0 else rng.normal(size=(4, 128)).astype(np.float32)
        record = {"video": url, "feature": {"image_pkl": image, "audio_pkl": audio}, "label": [str(c)]}
        with (root / "feature_files" / f"{i:04d}.pkl").open("wb") as f:
            pickle.dump(record, f, protocol=2)
        labels = CLASSES[c] + (",未知-标签" if i == 1 else "")
        split = "train" if i < n // 2 else ("val" if i < 3 * n // 4 else "test")
        title = "" if i % 4 == 3 else f"标题{CLASSES[c]}"
        lines[split].append(f"{url}\t{title}\t{labels}")
    lines["train"].append("http://example.com/videos/missing.mp4\t无文件\t拍人-帅哥")  # no pickle: skipped
    lines["train"].append("http://example.com/videos/0002.mp4\t重复\t拍人-帅哥")  # repeated url: first row wins
    lines["val"].append("http://example.com/videos/0009.mp4\t只有未知\t未知-标签")  # no known label: skipped
    for split, rows in lines.items():
        (root / f"{split}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def test_loads_mvt_format(tmp_path):
    root = write_mvt(tmp_path / "datasets")
    ds = open_features(root)
    assert isinstance(ds, MVTDataset)
    assert ds.labels.labels == CLASSES
    assert ds.splits() == {"train": 8, "val": 4, "test": 4}
    assert ds.dims == {"image": 32, "audio": 128, "text": 0}
    assert ds.extractors["image"]["id"] == "mvt-resnet50"
    v0 = ds.load("http://example.com/videos/0000.mp4")
    assert v0.audio.shape == (10, 128) and not v0.audio.any()  # empty audio -> zeros(10, 128), as MVT
    assert v0.image.dtype == np.float32 and v0.image.shape[1] == 32
    np.testing.assert_allclose(v0.image_times, np.arange(len(v0.image)))
    assert v0.title == "标题拍人-帅哥" and v0.labels == ["拍人-帅哥"] and v0.text.shape == (0, 0)
    assert ds.load("http://example.com/videos/0001.mp4").labels == ["拍人-秀特效"]  # unknown label dropped
    assert ds.load("http://example.com/videos/0002.mp4").title == "标题美食-烘焙"
    assert ds.load("http://example.com/videos/0003.mp4").title == ""
    kept = MVTDataset(root, empty_audio_zeros=False).load("http://example.com/videos/0000.mp4")
    assert kept.audio.shape == (0, 128)


def test_trains_on_mvt_format_with_the_char_branch(tmp_path):
    root = write_mvt(tmp_path / "datasets")
    opts = TrainOptions(epochs=2, batch_size=4, image_hidden=8, audio_hidden=4, text_filters=4, char_dim=4,
                        progress=False, device="cpu")
    summary = train(open_features(root), tmp_path / "ck", opts)
    assert summary["epochs_run"] == 2
    config = json.loads((tmp_path / "ck" / "config.json").read_text("utf-8"))
    assert config["fusion"]["text_dim"] == 0 and config["fusion"]["char_vocab_size"] > 2
    assert config["extractors"]["image"] == {"id": "mvt-resnet50", "dim": 32}


def test_index_column_in_class_file(tmp_path):
    root = write_mvt(tmp_path / "datasets")
    (root / "class.txt").write_text("".join(f"{c}\t{i}\n" for i, c in reversed(list(enumerate(CLASSES)))),
                                    encoding="utf-8")
    assert MVTDataset(root).labels.labels == CLASSES


@pytest.mark.parametrize("name", ["train.list"])
def test_list_file_names_accepted(tmp_path, name):
    root = write_mvt(tmp_path / "datasets")
    (root / "train.txt").rename(root / name)
    assert MVTDataset(root).splits()["train"] == 8
