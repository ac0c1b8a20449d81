"""``tagstream tag FILE``: the result document of one local file, through the real CLI entry point."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from media import image_video

from worker import cli
from worker.engine.document import MEDIA_KEYS, TIMING_KEYS

# ImageNet classes 281-285: tabby, tiger cat, Persian cat, Siamese cat, Egyptian cat
CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
FLAGS = ["--device", "cpu", "--hwaccel", "none", "--indent", "0"]


def skimage_photo(name: str) -> Path:
    return Path(list(importlib.util.find_spec("skimage").submodule_search_locations)[0]) / "data" / name


def run_tag(capsys, *argv: str) -> tuple[int, dict]:
    rc = cli.main(["tag", *argv, *FLAGS])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def test_a_video_of_chelsea_is_tagged_with_a_cat_concept(tmp_path, capsys):
    video = image_video(tmp_path / "chelsea.mp4", skimage_photo("chelsea.png"), seconds=3.0, fps=10)
    rc, doc = run_tag(capsys, str(video), "--title", "my cat on the sofa", "--video-id", "cat-42")
    assert rc == 0
    assert doc["schema"] == 1 and doc["status"] == "tagged" and doc["reason"] is None
    assert doc["video_id"] == "cat-42"
    assert doc["concepts"][0]["label"] in CAT_CLASSES, doc["concepts"]
    assert doc["concepts"][0]["score"] > 0.2
    assert set(doc["timings_s"]) == set(TIMING_KEYS) and doc["timings_s"]["total"] > 0
    assert set(MEDIA_KEYS) <= set(doc["media"])
    assert doc["media"]["frames"] == 3 and (doc["media"]["width"], doc["media"]["height"]) == (450, 300)
    assert doc["media"]["duration_s"] == 3.0
    if doc["model_version"] == "features-only":  # no checkpoint shipped yet: feature shapes instead of tags
        assert doc["tags"] == [] and doc["categories"] == []
        assert doc["features"]["image"][0] == 3 and doc["features"]["audio"] == [0, 128]
        assert doc["features"]["text"][0] >= 5
    else:
        assert doc["tags"] and all("-" in t["label"] and "segments" in t for t in doc["tags"])
        assert doc["categories"]


def test_a_corrupt_file_prints_the_failed_document_and_exits_1(tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    rc, doc = run_tag(capsys, str(bad))
    assert rc == 1
    assert doc["status"] == "failed" and doc["reason"] == "decode_error" and doc["video_id"] == "broken"
    assert doc["tags"] == [] and doc["error"]["permanent"] is True
    rc, doc = run_tag(capsys, str(tmp_path / "missing.mp4"))
    assert rc == 1 and doc["reason"] == "not_found"
