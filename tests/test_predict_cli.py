"""``tagstream predict CHECKPOINT INPUT --out FILE`` (model/batch_predict.py): a feature store and a
MultimodalVideoTag folder (labelled, and MVT's label-less inference list), result documents as JSON
Lines and MVT's inference JSON, --threshold against --top-k, resume, and the video-folder hook."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from test_mvt_data import CLASSES, write_mvt

from model import batch_predict
from model.chars import CharVocab
from model.checkpoint import load_checkpoint, save_checkpoint
from model.feature_store import FeatureStoreWriter
from model.features import VideoFeatures
from model.fusion import FusionConfig, FusionModel
from model.labels import LabelSet
from model.mvt_data import MVTDataset, open_source
from model.predict import Tagger, select

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LABELS = ["动物-猫", "动物-狗", "游戏-射击", "游戏-赛车", "美食-烘焙", "美食-火锅"]
STORE_IDS = {"image": {"id": "efficientnet_lite0.imagenet", "dim": 12}, "audio": {"id": "logmel-stats.v1", "dim": 128},
             "text": {"id": "all-minilm-l6-v2", "dim": 5}}
MVT_EXTRACTORS = {"image": {"id": "mvt-resnet50", "dim": 32}, "audio": {"id": "mvt-vggish", "dim": 128},
                  "text": {"id": None, "dim": 0}}
#: the keys of a result document (README "The Redis contract"; worker/result.py)
DOC_KEYS = {"schema", "video_id", "status", "reason", "model_version", "categories", "tags", "concepts", "media",
            "timings_s", "finished_at"}


def model_with_spread(config: FusionConfig, seed: int = 0, rising: bool = False) -> FusionModel:
    """A random model whose head bias spreads the probabilities from about 0.95 (first output) to 0.05
    (last), or the other way round when ``rising``."""
    torch.manual_seed(seed)
    model = FusionModel(config).eval()
    with torch.no_grad():
        model.head.bias.copy_(torch.linspace(3.0, -3.0, config.num_labels) * (-1 if rising else 1))
    return model


@pytest.fixture()
def store(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "store"
    with FeatureStoreWriter(root, STORE_IDS, {"fps": 1.0, "max_frames": 300}, labels=LABELS) as writer:
        for i in range(10):
            t = int(rng.integers(2, 7))
            video = VideoFeatures(f"v{i:02d}", rng.normal(size=(t, 12)), np.arange(t, dtype=np.float64),
                                  rng.normal(size=(3, 128)), rng.normal(size=(4 if i % 3 else 0, 5)),
                                  "猫咪" if i % 3 else "", [LABELS[i % 6]], float(t))
            writer.write(video, "train" if i < 6 else "test")
    return root


def store_checkpoint(path, seed=0, rising=False):
    chars = CharVocab.build(["猫咪"])
    config = FusionConfig(image_dim=12, audio_dim=128, text_dim=5, num_labels=len(LABELS), image_hidden=6,
                          audio_hidden=3, text_filters=4, char_vocab_size=len(chars), char_dim=4)
    save_checkpoint(path, model_with_spread(config, seed, rising), labels=LabelSet(LABELS), chars=chars,
                    extractors=STORE_IDS, sampling={"fps": 1.0, "max_frames": 300})
    return path


def mvt_checkpoint(path, root):
    ds = MVTDataset(root)
    chars = CharVocab.build(title for _, title, _ in ds.rows.values())
    config = FusionConfig(image_dim=32, audio_dim=128, text_dim=0, num_labels=len(ds.labels), image_hidden=6,
                          audio_hidden=3, text_filters=4, text_branch="chars", char_vocab_size=len(chars), char_dim=4)
    save_checkpoint(path, model_with_spread(config), labels=ds.labels, chars=chars, extractors=MVT_EXTRACTORS,
                    sampling={"fps": 1.0, "max_frames": 300})
    return path


def predict(ckpt, source, out, *extra) -> tuple[int, dict | None]:
    parser = argparse.ArgumentParser()
    batch_predict.add_arguments(parser)
    args = parser.parse_args([str(ckpt), str(source), "--out", str(out), "--device", "cpu", "--no-progress",
                              "--batch-size", "4", *extra])
    return batch_predict.run(args), None


def summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def scores_by_video(ckpt_dir, source) -> dict[str, np.ndarray]:
    ckpt = load_checkpoint(ckpt_dir)
    ids = batch_predict.video_ids(source, None)
    return dict(zip(ids, Tagger(ckpt).scores([source.load(v) for v in ids]), strict=True))


def test_input_kinds(tmp_path, store):
    root = write_mvt(tmp_path / "datasets")
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "class.txt").write_text("动物-猫\n", encoding="utf-8")
    (videos / "test.tsv").write_text("videos/a.mp4\t猫\t动物-猫\n", encoding="utf-8")
    assert batch_predict.input_kind(store) == "store"
    assert batch_predict.input_kind(root) == "mvt"
    assert batch_predict.input_kind(videos) == "videos"
    assert batch_predict.input_kind(videos / "test.tsv") == "videos"
    with pytest.raises(FileNotFoundError):
        batch_predict.input_kind(tmp_path / "nothing")


def test_a_video_folder_asks_for_extract_first(tmp_path, store):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "class.txt").write_text("动物-猫\n", encoding="utf-8")
    (videos / "test.tsv").write_text("videos/a.mp4\t猫\t动物-猫\n", encoding="utf-8")
    ck = store_checkpoint(tmp_path / "ck")
    with pytest.raises(batch_predict.VideoFolderInputError, match=f"tagstream extract {videos} STORE") as err:
        predict(ck, videos, tmp_path / "out.jsonl")
    assert isinstance(err.value, ValueError)
    assert not (tmp_path / "out.jsonl").exists()


def test_store_jsonl_documents_top_k_and_threshold(tmp_path, capsys, store):
    ck = store_checkpoint(tmp_path / "ck")
    scores = scores_by_video(ck, open_source(store))
    labels = LabelSet(LABELS)

    assert predict(ck, store, tmp_path / "default.jsonl")[0] == 0
    docs = jsonl(tmp_path / "default.jsonl")
    assert summary(capsys)["written"] == 10 and [d["video_id"] for d in docs] == [f"v{i:02d}" for i in range(10)]
    version = load_checkpoint(ck).version
    for doc in docs:
        assert set(doc) == DOC_KEYS and doc["schema"] == 1 and doc["status"] == "tagged" and doc["reason"] is None
        assert doc["model_version"] == version and doc["concepts"] == []
        assert set(doc["media"]) == {"duration_s", "frames", "audio_s", "width", "height"}
        assert doc["media"]["audio_s"] == pytest.approx(3 * 0.96)
        assert len(doc["tags"]) == 5 and len(doc["categories"]) == 3  # default --top-k 5 (3 categories exist)
        for tag in doc["tags"]:
            assert tag["score"] == round(float(scores[doc["video_id"]][labels.index[tag["label"]]]), 4)
            assert all(0 <= a < b <= doc["media"]["duration_s"] for a, b in tag["segments"])

    assert predict(ck, store, tmp_path / "top2.jsonl", "--top-k", "2")[0] == 0
    for doc in jsonl(tmp_path / "top2.jsonl"):
        row = scores[doc["video_id"]]
        assert [t["label"] for t in doc["tags"]] == [LABELS[i] for i in np.argsort(-row, kind="stable")[:2]]

    assert predict(ck, store, tmp_path / "t.jsonl", "--threshold", "0.6")[0] == 0
    docs = jsonl(tmp_path / "t.jsonl")
    assert {len(d["tags"]) for d in docs} != {5}  # not a fixed count
    for doc in docs:
        row = scores[doc["video_id"]]
        want = {LABELS[i] for i in np.flatnonzero(row >= 0.6)}
        assert {t["label"] for t in doc["tags"]} == want and want
        assert [t["score"] for t in doc["tags"]] == sorted((t["score"] for t in doc["tags"]), reverse=True)
        assert {c["label"] for c in doc["categories"]} == {label.split("-")[0] for label in want}

    assert predict(ck, store, tmp_path / "both.jsonl", "--threshold", "0.6", "--top-k", "1")[0] == 0
    assert all(len(d["tags"]) == 1 for d in jsonl(tmp_path / "both.jsonl"))

    assert predict(ck, store, tmp_path / "split.jsonl", "--split", "test")[0] == 0
    assert [d["video_id"] for d in jsonl(tmp_path / "split.jsonl")] == ["v06", "v07", "v08", "v09"]


def test_store_mvt_format(tmp_path, capsys, store):
    ck = store_checkpoint(tmp_path / "ck", rising=True)  # the likeliest labels last: class order != score order
    scores = scores_by_video(ck, open_source(store))
    out = tmp_path / "mvt.json"
    assert predict(ck, store, out, "--format", "mvt")[0] == 0
    result = json.loads(out.read_text("utf-8"))
    assert out.read_text("utf-8").startswith("[\n    {")  # json.dump(..., indent=4), as MVT writes it
    assert [r["video_id"] for r in result] == [f"v{i:02d}" for i in range(10)]
    for entry in result:
        assert set(entry) == {"video_id", "labels"}
        row = scores[entry["video_id"]]
        # MVT: every label with prob >= 0.5, in class order, [name, prob]
        assert entry["labels"] == [[LABELS[i], pytest.approx(float(row[i]), abs=1e-6)] for i in np.flatnonzero(row >= 0.5)]
    assert predict(ck, store, tmp_path / "k.json", "--format", "mvt", "--top-k", "2")[0] == 0
    for entry in json.loads((tmp_path / "k.json").read_text("utf-8")):
        top = sorted(np.argsort(-scores[entry["video_id"]], kind="stable")[:2])
        assert [name for name, _ in entry["labels"]] == [LABELS[i] for i in top]
        assert entry["labels"][0][1] < entry["labels"][1][1]  # class order, not score order


@pytest.mark.parametrize("labelled", [True, False])
def test_mvt_folder_with_and_without_labels(tmp_path, capsys, labelled):
    root = write_mvt(tmp_path / "datasets")
    ck = mvt_checkpoint(tmp_path / "ck", root)
    if not labelled:  # MVT's inference list: url \t title, no label column
        rows = [line.split("\t") for line in (root / "test.txt").read_text("utf-8").splitlines()]
        (root / "test.txt").write_text("".join(f"{url}\t{title}\n" for url, title, _ in rows), encoding="utf-8")
        assert MVTDataset(root).splits().get("test", 0) == 0  # training still needs labels
    test_ids = [f"http://example.com/videos/{i:04d}.mp4" for i in range(12, 16)]
    assert MVTDataset(root, infer=True).split_ids("test") == test_ids
    scores = scores_by_video(ck, MVTDataset(root, infer=True))

    assert predict(ck, root, tmp_path / "out.jsonl", "--split", "test")[0] == 0
    docs = jsonl(tmp_path / "out.jsonl")
    assert [d["video_id"] for d in docs] == test_ids
    assert all(set(d) == DOC_KEYS and len(d["tags"]) == len(CLASSES) and d["media"]["audio_s"] is None for d in docs)

    out = tmp_path / "mvt.json"
    assert predict(ck, root, out, "--format", "mvt", "--threshold", "0.4")[0] == 0
    result = json.loads(out.read_text("utf-8"))
    assert len(result) == 16 and summary(capsys)["videos"] == 16  # every listed video with a pickle
    labels = load_checkpoint(ck).labels
    for entry in result:
        row = scores[entry["video_id"]]
        assert entry["labels"] == [[labels.labels[i], pytest.approx(float(row[i]), abs=1e-6)]
                                   for i in np.flatnonzero(row >= 0.4)]
        assert all(name in CLASSES for name, _ in entry["labels"])


@pytest.mark.parametrize("fmt", ["jsonl", "mvt"])
def test_resume_skips_what_is_written(tmp_path, capsys, store, fmt):
    ck = store_checkpoint(tmp_path / "ck")
    out = tmp_path / ("out.jsonl" if fmt == "jsonl" else "out.json")
    lines = out if fmt == "jsonl" else out.with_name(out.name + ".partial.jsonl")
    assert predict(ck, store, out, "--format", fmt)[0] == 0
    assert summary(capsys)["written"] == 10
    first = out.read_bytes()

    assert predict(ck, store, out, "--format", fmt)[0] == 0  # a rerun: nothing appended, output unchanged
    assert summary(capsys) | {"model_version": None} == {
        "written": 0, "skipped": 10, "failed": 0, "videos": 10, "out": str(out), "format": fmt, "model_version": None}
    assert out.read_bytes() == first

    # a crash after 3 videos, in the middle of the 4th line: the rerun tags the other 7, once each
    kept = lines.read_text("utf-8").splitlines(keepends=True)
    lines.write_text("".join(kept[:3]) + kept[3][:20], encoding="utf-8")
    if fmt == "mvt":
        out.unlink()
    assert predict(ck, store, out, "--format", fmt)[0] == 0
    assert summary(capsys)["written"] == 7
    if fmt == "jsonl":
        docs = jsonl(out)
        assert [d["video_id"] for d in docs] == [f"v{i:02d}" for i in range(10)]
        assert docs[:3] == [json.loads(x) for x in kept[:3]]
    else:
        assert json.loads(out.read_text("utf-8")) == json.loads(first)


def test_output_of_another_model_is_refused(tmp_path, capsys, caplog, store):
    out = tmp_path / "out.jsonl"
    assert predict(store_checkpoint(tmp_path / "ck1", seed=0), store, out)[0] == 0
    other = store_checkpoint(tmp_path / "ck2", seed=1)
    assert predict(other, store, out)[0] == 2
    assert "--restart" in caplog.text
    assert predict(other, store, out, "--restart")[0] == 0
    assert {d["model_version"] for d in jsonl(out)} == {load_checkpoint(other).version}


def test_features_from_another_extractor_are_refused(tmp_path, caplog, store):
    ck = tmp_path / "ck"
    store_checkpoint(ck)
    meta = json.loads((ck / "config.json").read_text("utf-8"))
    meta["extractors"]["text"]["id"] = "bert-base-chinese.0123456789ab"
    (ck / "config.json").write_text(json.dumps(meta), encoding="utf-8")
    assert predict(ck, store, tmp_path / "out.jsonl")[0] == 2
    assert "bert-base-chinese.0123456789ab" in caplog.text and "all-minilm-l6-v2" in caplog.text


def test_select_threshold_top_k_and_unused_outputs():
    scores = np.array([0.2, 0.9, 0.5, 0.7, 0.95], dtype=np.float32)
    assert select(scores, top_k=2, threshold=None) == [4, 1]
    assert select(scores, top_k=None, threshold=0.5) == [4, 1, 3, 2]  # at or above, highest first
    assert select(scores, top_k=2, threshold=0.8) == [4, 1]
    assert select(scores, top_k=3, threshold=0.92) == [4]
    assert select(scores, top_k=None, threshold=0.5, exclude=frozenset({4})) == [1, 3, 2]  # an unused output
