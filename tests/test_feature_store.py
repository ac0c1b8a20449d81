"""Feature store: write/read round trip, resume, torn manifest lines, extractor guard, failures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.feature_store import FeatureStore, FeatureStoreWriter
from model.features import VideoFeatures
from model.mvt_data import open_source

EXTRACTORS = {"image": {"id": "efficientnet_lite0", "dim": 8}, "audio": {"id": "vggish-summary", "dim": 128},
              "text": {"id": "all-MiniLM-L6-v2", "dim": 4}}
SAMPLING = {"fps": 1.0, "max_frames": 300}


def features(i: int, n_audio: int = 2, title: str = "标题") -> VideoFeatures:
    rng = np.random.default_rng(i)
    return VideoFeatures(f"videos/clip {i}.mp4", rng.normal(size=(3, 8)), [0.5, 1.5, 2.5],
                         rng.normal(size=(n_audio, 128)), rng.normal(size=(2 if title else 0, 4)),
                         title, ["a-b", "a-c"], 3.1)


def test_round_trip(tmp_path):
    with FeatureStoreWriter(tmp_path, EXTRACTORS, SAMPLING, labels=["a-b", "a-c", "d-e"]) as w:
        w.write(features(0), "train")
        w.write(features(1, n_audio=0, title=""), "val")  # no audio, no title
    store = open_source(tmp_path)
    assert isinstance(store, FeatureStore) and len(store) == 2
    assert store.splits() == {"train": 1, "val": 1}
    assert store.extractor_ids == {"image": "efficientnet_lite0", "audio": "vggish-summary", "text": "all-MiniLM-L6-v2"}
    assert store.labels.labels == ["a-b", "a-c", "d-e"] and store.sampling == SAMPLING
    assert store.dims == {"image": 8, "audio": 128, "text": 4}
    a = store.load("videos/clip 0.mp4")
    ref = features(0)
    np.testing.assert_array_equal(a.image, ref.image)
    np.testing.assert_array_equal(a.image_times, ref.image_times)
    np.testing.assert_array_equal(a.audio, ref.audio)
    np.testing.assert_array_equal(a.text, ref.text)
    assert (a.title, a.labels, a.duration_s) == ("标题", ["a-b", "a-c"], pytest.approx(3.1))
    b = store.load("videos/clip 1.mp4")
    assert b.audio.shape == (0, 128) and b.text.shape == (0, 4) and b.title == ""
    assert [v.video_id for v in store.iter("val")] == ["videos/clip 1.mp4"]


def test_resume_and_torn_line(tmp_path):
    w = FeatureStoreWriter(tmp_path, EXTRACTORS, SAMPLING)
    w.write(features(0), "train")
    w.record_failure("broken.mp4", "train", "decode_error")
    w.close()
    with (tmp_path / "manifest.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"video_id": "half')  # a crash in the middle of a line
    w = FeatureStoreWriter(tmp_path, EXTRACTORS, SAMPLING)
    assert w.has("videos/clip 0.mp4") and w.has("broken.mp4") and not w.has("videos/clip 1.mp4")
    w.write(features(1), "test")
    w.close()
    store = FeatureStore(tmp_path)
    assert sorted(store.records) == ["videos/clip 0.mp4", "videos/clip 1.mp4"]
    assert store.failures == [{"video_id": "broken.mp4", "split": "train", "reason": "decode_error"}]
    assert store.labels.labels == ["a-b", "a-c"]  # derived from the manifest when no labels.txt
    assert FeatureStoreWriter(tmp_path, EXTRACTORS, SAMPLING, retry_failed=True).has("broken.mp4") is False


def test_other_extractors_cannot_continue_a_store(tmp_path):
    FeatureStoreWriter(tmp_path, EXTRACTORS, SAMPLING).close()
    other = json.loads(json.dumps(EXTRACTORS))
    other["image"]["id"] = "resnet50"
    with pytest.raises(ValueError, match="resnet50"):
        FeatureStoreWriter(tmp_path, other, SAMPLING)


def test_open_source_rejects_unknown_folders(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_source(tmp_path)
