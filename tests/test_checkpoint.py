"""Checkpoint round trip: same outputs, stable version, extractor mismatch errors, predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.chars import CharVocab
from model.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint
from model.collate import collate
from model.features import VideoFeatures
from model.fusion import FusionConfig, FusionModel
from model.labels import LabelSet
from model.predict import Tagger

LABELS = LabelSet(["动物-猫", "动物-狗", "游戏-射击"])
EXTRACTORS = {"image": {"id": "efficientnet_lite0", "dim": 12}, "audio": {"id": "vggish-summary", "dim": 128},
              "text": {"id": "all-MiniLM-L6-v2", "dim": 5}}
SAMPLING = {"fps": 1.0, "max_frames": 300}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_videos():
    rng = np.random.default_rng(3)
    return [
        VideoFeatures(f"v{i}", rng.normal(size=(t, 12)), np.arange(t) * 2.0, rng.normal(size=(a, 128)),
                      rng.normal(size=(3, 5)), title, [], 2.0 * t)
        for i, (t, a, title) in enumerate([(4, 2, "猫咪"), (6, 0, ""), (1, 5, "小狗 dog")])
    ]


def make_model(chars, **kw):
    torch.manual_seed(0)
    config = FusionConfig(image_dim=12, audio_dim=128, text_dim=5, num_labels=3, image_hidden=6, audio_hidden=3,
                          text_filters=4, char_vocab_size=len(chars), char_dim=4, **kw)
    return FusionModel(config).eval()


@pytest.fixture()
def saved(tmp_path):
    chars = CharVocab.build(["猫咪", "小狗 dog"])
    model = make_model(chars)
    version = save_checkpoint(tmp_path / "ck", model, labels=LABELS, chars=chars, extractors=EXTRACTORS,
                              sampling=SAMPLING, extra={"note": "test"})
    return tmp_path / "ck", model, chars, version


def test_round_trip_same_outputs_and_metadata(saved):
    path, model, chars, version = saved
    assert sorted(p.name for p in path.iterdir()) == ["chars.json", "config.json", "labels.txt", "model.safetensors"]
    ckpt = load_checkpoint(path, expected_extractors={k: v["id"] for k, v in EXTRACTORS.items()})
    assert ckpt.version == version and len(version) == 12
    assert ckpt.labels == LABELS and ckpt.chars == chars
    assert ckpt.extractors == EXTRACTORS and ckpt.sampling == SAMPLING
    assert ckpt.config == model.config and not ckpt.model.training
    meta = json.loads((path / "config.json").read_text("utf-8"))
    assert meta["labels_hash"] == LABELS.hash() and meta["version"] == version
    batch = collate(make_videos(), labels=None, chars=chars)
    with torch.no_grad():
        assert torch.equal(model(batch).logits, ckpt.model(batch).logits)


def test_version_is_stable_and_follows_the_weights(saved, tmp_path):
    path, model, chars, version = saved
    again = save_checkpoint(tmp_path / "other", model, labels=LABELS, chars=chars, extractors=EXTRACTORS,
                            sampling=SAMPLING)
    assert again == version
    with torch.no_grad():
        model.head.bias[0] += 1e-3
    changed = save_checkpoint(tmp_path / "other", model, labels=LABELS, chars=chars, extractors=EXTRACTORS,
                              sampling=SAMPLING)
    assert changed != version


def test_extractor_mismatch_is_an_error_naming_both_ids(saved):
    path, *_ = saved
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(path, expected_extractors={"image": "resnet50", "audio": "vggish-summary"})
    assert "efficientnet_lite0" in str(err.value) and "resnet50" in str(err.value)
    assert isinstance(err.value, ValueError)
    with pytest.raises(CheckpointMismatchError):
        load_checkpoint(path, expected_extractors={"text": "bert-base-chinese"})


def test_chars_only_model_does_not_depend_on_the_text_encoder(tmp_path):
    chars = CharVocab.build(["猫咪"])
    model = make_model(chars, text_branch="chars")
    save_checkpoint(tmp_path, model, labels=LABELS, chars=chars, extractors=EXTRACTORS, sampling=SAMPLING)
    load_checkpoint(tmp_path, expected_extractors={"image": "efficientnet_lite0", "text": "anything-else"})


def test_tagger_predicts_categories_tags_and_segments(saved):
    path, *_ = saved
    ckpt = load_checkpoint(path)
    videos = make_videos()
    preds = Tagger(ckpt, top_k=2, batch_size=2).predict(videos)
    assert [p.video_id for p in preds] == ["v0", "v1", "v2"]
    scores = Tagger(ckpt).scores(videos)
    for p, v, row in zip(preds, videos, scores, strict=True):
        doc = p.to_dict()
        assert [t["label"] for t in doc["tags"]] == [LABELS.labels[i] for i in np.argsort(-row)[:2]]
        assert doc["categories"][0]["score"] == pytest.approx(max(t["score"] for t in doc["tags"]), abs=1e-6)
        for tag in doc["tags"]:
            for start, end in tag["segments"]:
                assert 0.0 <= start < end <= v.duration_s
    assert any(t.segments for p in preds for t in p.tags)
