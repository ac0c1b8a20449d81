"""``tagstream extract DATA_DIR OUT_DIR`` end to end: real videos -> feature store, then resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from media import make_video

from model.feature_store import FeatureStore
from worker import cli
from worker.tools.extract import extract, read_split

FLAGS = ["--device", "cpu", "--hwaccel", "none", "--decode-threads", "2", "--no-progress"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Six videos in the generator's layout (one without audio, one without a title) plus a broken one."""
    d = tmp_path_factory.mktemp("mvt")
    specs = {
        "g1": (2.0, "aac", "boss fight speedrun", "游戏-射击", "train"),
        "g2": (3.0, "aac", "drift race replay", "游戏-赛车,游戏-射击", "train"),
        "m1": (2.0, None, "piano cover", "音乐-钢琴", "train"),
        "m2": (2.0, "aac", "", "音乐-钢琴", "train"),
        "c1": (3.0, "aac", "my cat sleeps", "动物-猫", "val"),
        "c2": (2.0, "aac", "kitten plays", "动物-猫", "test"),
    }
    rows: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for vid, (seconds, audio, title, labels, split) in specs.items():
        make_video(d / "videos" / f"{vid}.mp4", seconds=seconds, fps=10, audio=audio)
        rows[split].append(f"videos/{vid}.mp4\t{title}\t{labels}")
    (d / "videos" / "bad.mp4").write_bytes(b"not a video at all\n" * 100)
    rows["train"].append("videos/bad.mp4\tbroken upload\t游戏-射击")
    for split, lines in rows.items():
        (d / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def test_read_split_parses_mvt_rows(data_dir):
    rows = read_split(data_dir, "train")
    assert [r.video_id for r in rows] == ["g1", "g2", "m1", "m2", "bad"]
    assert rows[1].labels == ["游戏-赛车", "游戏-射击"] and rows[1].title == "drift race replay"
    assert rows[3].title == "" and rows[0].path == data_dir / "videos" / "g1.mp4"


def test_extract_writes_the_store_and_resume_does_nothing_new(data_dir, tmp_path, capsys):
    out = tmp_path / "store"
    rc = cli.main(["extract", str(data_dir), str(out), *FLAGS])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert summary == {"written": 6, "skipped": 0, "failed": 1, "failed_reasons": {"decode_error": 1}}

    store = FeatureStore(out)
    assert len(store) == 6
    assert store.splits() == {"train": 4, "val": 1, "test": 1}
    meta = json.loads((out / "store.json").read_text())
    assert meta["extractors"]["image"]["id"] == "efficientnet_lite0.imagenet"
    assert meta["sampling"] == {"fps": 1.0, "max_frames": 300}
    g2 = store.load("g2")
    assert g2.image.shape == (3, 1280) and g2.audio.shape == (3, 128)
    assert g2.text.shape[1] == 384 and g2.text.shape[0] >= 4
    assert g2.labels == ["游戏-赛车", "游戏-射击"] and g2.title == "drift race replay"
    # one frame per 1 s bin, within half a sample interval of the bin centre (the decoder's contract)
    assert np.all(np.abs(g2.image_times - [0.5, 1.5, 2.5]) <= 0.5 + 1e-6)
    m1, m2 = store.load("m1"), store.load("m2")
    assert m1.audio.shape == (0, 128) and m1.image.shape == (2, 1280)
    assert m2.text.shape[0] == 0 and m2.audio.shape == (2, 128)
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert failed == [{"video_id": "bad", "split": "train", "reason": "decode_error"}]
    files = sorted(p.name for p in (out / "videos").iterdir())
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "videos").iterdir()}

    # resume: everything is in the store (or recorded as failed): nothing is decoded or written again
    again = extract(data_dir, out, settings=None, progress=False)
    assert again.to_dict() == {"written": 0, "skipped": 7, "failed": 0, "failed_reasons": {}}
    assert sorted(p.name for p in (out / "videos").iterdir()) == files
    assert {p.name: p.stat().st_mtime_ns for p in (out / "videos").iterdir()} == mtimes
    assert len(FeatureStore(out)) == 6


def test_extract_limit_and_splits(data_dir, tmp_path):
    from worker.config import Settings

    summary = extract(data_dir, tmp_path / "s", splits=("train", "test"), limit=2, progress=False,
                      settings=Settings(device="cpu", hwaccel="none", decode_threads=2))
    assert summary.written == 3 and summary.failed == 0
    assert FeatureStore(tmp_path / "s").splits() == {"train": 2, "test": 1}


def test_predict_extracts_a_folder_of_videos_then_tags_it(data_dir, tmp_path, capsys):
    """``tagstream predict CKPT VIDEOS``: the raw videos go through extract into OUT.features, then get tagged;
    a rerun extracts and tags nothing new."""
    from worker_support import save_tiny_checkpoint, shared_models

    ck = tmp_path / "ck"
    save_tiny_checkpoint(ck, shared_models().extractors.ids())
    out = tmp_path / "tags.jsonl"
    argv = ["predict", str(ck), str(data_dir), "--out", str(out), *FLAGS]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == 6 and summary["failed"] == 0
    docs = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    assert sorted(d["video_id"] for d in docs) == ["c1", "c2", "g1", "g2", "m1", "m2"]
    assert all(d["status"] == "tagged" and d["tags"] for d in docs)
    assert FeatureStore(tmp_path / "tags.jsonl.features").splits() == {"train": 4, "val": 1, "test": 1}
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 0


def test_class_txt_is_read_as_multimodalvideotag_reads_it(tmp_path):
    """Index columns, a blank line and an alias map to the indices MVT's reader gives them."""
    from worker.tools.extract import read_labels

    (tmp_path / "class.txt").write_text("动物-猫\t1\n动物-狗\t0\n\n动物-小猫\t1\n", encoding="utf-8")
    labels = read_labels(tmp_path, [])
    assert labels.labels == ["动物-狗", "动物-小猫"]
    assert labels.aliases == {"动物-猫": 1}
