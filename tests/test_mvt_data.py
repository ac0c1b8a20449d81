"""MultimodalVideoTag's own format: a small set written exactly that way loads and trains; its pickles
never run code; class.txt maps names to MVT's indices; evaluate falls back to val."""

from __future__ import annotations

import json
import logging
import os
import pickle

import numpy as np
import pytest
from test_safe_loading import PY2_PROTOCOL2

from model.checkpoint import load_checkpoint
from model.labels import LabelSet
from model.mvt_data import MVTDataset, open_source
from model.safe_pickle import UnsafePickleError
from model.train import TrainOptions, train
from worker.cli import main

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
    ds = open_source(root)
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
    summary = train(open_source(root), tmp_path / "ck", opts)
    assert summary["epochs_run"] == 2
    config = json.loads((tmp_path / "ck" / "config.json").read_text("utf-8"))
    assert config["fusion"]["text_dim"] == 0 and config["fusion"]["char_vocab_size"] > 2
    assert config["extractors"]["image"] == {"id": "mvt-resnet50", "dim": 32}


def test_index_column_in_class_file(tmp_path):
    root = write_mvt(tmp_path / "datasets")
    (root / "class.txt").write_text("".join(f"{c}\t{i}\n" for i, c in reversed(list(enumerate(CLASSES)))),
                                    encoding="utf-8")
    assert MVTDataset(root).labels.labels == CLASSES


def test_inference_lists_keep_unlabelled_rows(tmp_path):
    """MVT's reader in infer mode reads url and title only: a ``url \\t title`` list, or rows whose
    labels are all unknown, still give videos; training (the default) keeps skipping them."""
    root = write_mvt(tmp_path / "datasets")
    (root / "test.txt").write_text("http://example.com/videos/0012.mp4\t无标签\n"
                                   "http://example.com/videos/0013.mp4\n"
                                   "http://example.com/videos/0014.mp4\t未知\t未知-标签\n"
                                   "http://example.com/videos/0015.mp4\t有标签\t游戏-射击\n"
                                   "http://example.com/videos/0099.mp4\t没有文件\n", encoding="utf-8")
    assert MVTDataset(root).split_ids("test") == ["http://example.com/videos/0015.mp4"]
    ds = MVTDataset(root, infer=True)
    assert ds.split_ids("test") == [f"http://example.com/videos/{i:04d}.mp4" for i in (12, 13, 14, 15)]
    assert [ds.load(v).labels for v in ds.split_ids("test")] == [[], [], [], ["游戏-射击"]]
    assert [ds.load(v).title for v in ds.split_ids("test")] == ["无标签", "", "未知", "有标签"]
    assert ds.splits() == {"train": 8, "val": 4, "test": 4}  # val's unknown-label row repeats a url: first wins


@pytest.mark.parametrize("name", ["train.list"])
def test_list_file_names_accepted(tmp_path, name):
    root = write_mvt(tmp_path / "datasets")
    (root / "train.txt").rename(root / name)
    assert MVTDataset(root).splits()["train"] == 8


# --- safety: opening a folder or reading a video never runs code from it ---------------------------


class Payload:
    """Runs ``touch MARKER`` when loaded by the standard unpickler."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(root, stem, marker):
    """Replace feature_files/<stem>.pkl with a pickle whose loading would run a command."""
    path = root / "feature_files" / f"{stem}.pkl"
    record = {"video": stem, "feature": {"image_pkl": Payload(marker), "audio_pkl": np.zeros((0, 128))}}
    path.write_bytes(pickle.dumps(record, protocol=2))
    return path


def test_opening_a_folder_with_a_code_pickle_refuses_it(tmp_path):
    root = write_mvt(tmp_path / "datasets")
    marker = tmp_path / "pwned"
    path = plant(root, "0000", marker)  # the first video: read when the folder is opened (image width)
    with pytest.raises(UnsafePickleError, match=f"{path}: refused global '{os.system.__module__}.system'"):
        open_source(root)
    assert not marker.exists()


def test_reading_a_code_pickle_refuses_it(tmp_path):
    root = write_mvt(tmp_path / "datasets")
    marker = tmp_path / "pwned"
    path = plant(root, "0005", marker)
    ds = open_source(root)  # opening reads 0000 only
    assert ds.load("http://example.com/videos/0004.mp4").image.shape[1] == 32
    with pytest.raises(UnsafePickleError) as info:
        ds.load("http://example.com/videos/0005.mp4")
    assert info.value.path == str(path) and info.value.refused == f"global '{os.system.__module__}.system'"
    assert "only plain data and numpy arrays are allowed" in str(info.value)
    assert not marker.exists()


def test_python2_and_python3_pickles_give_the_same_arrays(tmp_path):
    root = write_mvt(tmp_path / "datasets")
    image = np.arange(6, dtype=np.float32).reshape(2, 3) / 4  # what PY2_PROTOCOL2 holds
    (root / "feature_files" / "0000.pkl").write_bytes(PY2_PROTOCOL2)  # written by Python 2 + NumPy 1.16
    py3 = {"video": "http://example.com/猫.mp4", "label": ["0"],
           "feature": {"image_pkl": image, "audio_pkl": np.zeros((0, 128), np.float32)}}
    for stem, protocol in (("0004", 5), ("0008", 2)):
        (root / "feature_files" / f"{stem}.pkl").write_bytes(pickle.dumps(py3, protocol=protocol))
    ds = MVTDataset(root)
    assert ds.dims["image"] == 3  # the image width comes from the first (Python 2) pickle
    loaded = [ds.load(f"http://example.com/videos/{stem}.mp4") for stem in ("0000", "0004", "0008")]
    for v in loaded:
        assert v.image.dtype == np.float32 and np.array_equal(v.image, image)
        assert v.audio.shape == (10, 128) and not v.audio.any()  # empty audio -> zeros(10, 128), as MVT


# --- class.txt: the indices MVT's reader gives ------------------------------------------------------


def test_class_file_blank_lines_and_aliases_map_as_mvt(tmp_path):
    """MVT's load_class_file: index = the line's number (blank lines counted), or the second column
    when a line has exactly two; a name seen again takes the later index; names sharing an index are
    one output. MVT's inference prints, for an index, the name it inserted last into that dict."""
    root = write_mvt(tmp_path / "datasets")
    (root / "class.txt").write_text(
        "拍人-帅哥\n"  # line 0 -> 0
        "\n"  # line 1: blank, index 1 named by nothing
        "拍人-秀特效\n"  # line 2 -> 2
        "美食-烘焙\t3\n"  # line 3 -> 3
        "美食-甜点\t3\n"  # line 4 -> 3: an alias of 美食-烘焙 (index 4 named by nothing)
        "游戏-射击\n"  # line 5 -> 5
        "拍人-靓仔\t0\n"  # line 6 -> 0: an alias of 拍人-帅哥
        "  \n",  # line 7: blank (whitespace only), past the last index: no output
        encoding="utf-8",
    )
    (root / "feature_files" / "0100.pkl").write_bytes((root / "feature_files" / "0000.pkl").read_bytes())
    (root / "train.txt").write_text(
        (root / "train.txt").read_text("utf-8") + "http://example.com/videos/0100.mp4\t别名\t美食-甜点,拍人-靓仔\n",
        encoding="utf-8")
    ds = MVTDataset(root)
    labels = ds.labels
    assert labels.index == {"拍人-帅哥": 0, "拍人-靓仔": 0, "拍人-秀特效": 2, "美食-烘焙": 3, "美食-甜点": 3,
                            "游戏-射击": 5}
    assert len(labels) == 6 and labels.unused == {1, 4}
    assert labels.labels == ["拍人-靓仔", "<unused:1>", "拍人-秀特效", "美食-甜点", "<unused:4>", "游戏-射击"]
    assert labels.aliases == {"拍人-帅哥": 0, "美食-烘焙": 3}
    assert labels.level1 == ["拍人", "美食", "游戏"] and labels.children == [[0, 2], [3], [5]]
    assert labels.parent.tolist() == [0, -1, 0, 1, -1, 2]
    # an alias and its label give the same target
    np.testing.assert_array_equal(labels.encode(["美食-甜点"]), labels.encode(["美食-烘焙"]))
    np.testing.assert_array_equal(labels.encode(["拍人-帅哥", "美食-甜点"]), [1, 0, 0, 1, 0, 0])
    # a row whose labels are all aliases is kept (they are known names) and targets their outputs
    alias_row = ds.load("http://example.com/videos/0100.mp4")
    assert alias_row.labels == ["美食-甜点", "拍人-靓仔"] and ds.splits()["train"] == 9
    np.testing.assert_array_equal(labels.encode(alias_row.labels), [1, 0, 0, 1, 0, 0])
    # level-1 scores: the max over the used children only
    probs = np.array([[0.1, 0.99, 0.3, 0.2, 0.99, 0.6]])
    np.testing.assert_allclose(labels.level1_scores(probs), [[0.3, 0.2, 0.6]])
    # written and read back (labels.txt of checkpoints and stores): the same set, the same hash
    labels.to_file(tmp_path / "labels.txt")
    again = LabelSet.from_file(tmp_path / "labels.txt")
    assert again == labels and again.hash() == labels.hash() and again.index == labels.index
    assert LabelSet(["a-x", "b-y"]).to_text() == "a-x\nb-y\n"  # a plain set keeps the plain form


def test_class_file_index_that_is_not_a_number_is_an_error(tmp_path):
    (tmp_path / "class.txt").write_text("a-x\nb-y\tone\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"class.txt:2: index 'one'"):
        LabelSet.from_file(tmp_path / "class.txt")
    (tmp_path / "class.txt").write_text("a-x\t-1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a non-negative integer"):
        LabelSet.from_file(tmp_path / "class.txt")
    (tmp_path / "class.txt").write_text("a-x\t3\tmore\n", encoding="utf-8")  # three fields: the line number
    assert LabelSet.from_file(tmp_path / "class.txt").index == {"a-x": 0}


def test_train_and_evaluate_with_aliases_and_no_test_split(tmp_path, capsys, caplog):
    """A checkpoint keeps the folder's aliases and unused outputs; ``tagstream evaluate`` on a folder
    without test.txt evaluates val and says so."""
    root = write_mvt(tmp_path / "datasets")
    (root / "class.txt").write_text("拍人-帅哥\n\n拍人-秀特效\n美食-烘焙\n游戏-射击\n美食-甜点\t3\n", encoding="utf-8")
    (root / "test.txt").unlink()
    opts = TrainOptions(epochs=1, batch_size=4, image_hidden=8, audio_hidden=4, text_filters=4, char_dim=4,
                        progress=False, device="cpu")
    train(open_source(root), tmp_path / "ck", opts)
    ckpt = load_checkpoint(tmp_path / "ck")
    assert ckpt.labels == MVTDataset(root).labels and ckpt.labels.unused == {1}
    assert ckpt.labels.aliases == {"美食-烘焙": 3}
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="model.evaluate"):
        assert main(["evaluate", str(tmp_path / "ck"), str(root), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["split"] == "val" and result["split_fallback_from"] == "test" and result["videos"] == 4
    assert "no 'test' split" in caplog.text and "evaluating 'val' instead" in caplog.text
    assert result["report"].endswith("eval_val.tsv") and result["per_class_ap"]["<unused:1>"] is None
    # an explicit split that is not there: one error line and status 1, no traceback
    caplog.clear()
    assert main(["evaluate", str(tmp_path / "ck"), str(root), "--split", "test", "--device", "cpu"]) == 1
    assert "no videos in split 'test'" in caplog.text
