"""The in-process pipeline on real encoded videos, the real extractors and a real (tiny) checkpoint."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from media import make_video

from model.features import VideoFeatures
from worker.config import Settings
from worker.engine.document import MEDIA_KEYS, TIMING_KEYS
from worker.engine.models import FEATURES_ONLY, LoadedModels, load_models
from worker.engine.pipeline import Pipeline
from worker.engine.request import VideoRequest
from worker.errors import DecodeError, MediaTimeoutError, ShutdownError, TagstreamError
from worker.metrics import Metrics

LABELS = ["游戏-射击", "游戏-赛车", "音乐-钢琴", "动物-猫"]


def save_tiny_checkpoint(path: Path, extractor_ids: dict) -> str:
    """A real checkpoint directory with a small, randomly initialised fusion model."""
    from model.checkpoint import save_checkpoint
    from model.fusion import FusionConfig, FusionModel
    from model.labels import LabelSet

    torch.manual_seed(0)
    dims = {k: v["dim"] for k, v in extractor_ids.items()}
    cfg = FusionConfig(image_dim=dims["image"], audio_dim=dims["audio"], text_dim=dims["text"],
                       num_labels=len(LABELS), image_hidden=16, audio_hidden=8, text_filters=8,
                       text_branch="encoder")
    return save_checkpoint(path, FusionModel(cfg), labels=LabelSet(LABELS), chars=None,
                           extractors=extractor_ids, sampling={"fps": 1.0, "max_frames": 300})


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pipeline_media")
    files = {
        "av3": make_video(d / "av3.mp4", seconds=3.0, fps=10, audio="aac"),  # 3 frames, 3 audio patches
        "v2": make_video(d / "v2.mp4", seconds=2.0, fps=10),  # 2 frames, no audio
        "wide4": make_video(d / "wide4.mp4", seconds=4.0, fps=12, size=(256, 144)),  # 4 frames
        "webm3": make_video(d / "webm3.webm", seconds=3.0, fps=10, codec="libvpx-vp9"),  # 3 frames
    }
    bad = d / "corrupt.mp4"
    bad.write_bytes(np.random.default_rng(3).integers(0, 256, 32 * 1024, dtype=np.uint8).tobytes())
    files["corrupt"] = bad
    return files


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> LoadedModels:
    from worker.engine.models import load_extractors

    extractors = load_extractors(Settings(device="cpu"))
    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_tiny_checkpoint(ckpt, extractors.ids())
    return load_models(Settings(device="cpu", checkpoint=ckpt), extractors=extractors)


class RecordingImage:
    """Wraps the image extractor: records batch sizes, can fail on a poison colour or block."""

    def __init__(self, inner, poison: tuple[int, int, int] | None = None) -> None:
        self.inner = inner
        self.poison = poison
        self.batches: list[int] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, frames):
        self.batches.append(len(frames))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        arr = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if self.poison is not None:
            centre = arr[:, arr.shape[1] // 2, arr.shape[2] // 2].astype(int)
            if (np.abs(centre - np.array(self.poison)).max(axis=1) <= 40).any():
                raise RuntimeError("poisoned frame")
        return self.inner(frames)


def with_image(models: LoadedModels, image) -> LoadedModels:
    return dataclasses.replace(models, extractors=dataclasses.replace(models.extractors, image=image))


def settings(**kw) -> Settings:
    base = {"device": "cpu", "decode_threads": 2, "batch_max_wait_s": 0.02, "hwaccel": "none"}
    return Settings(**{**base, **kw})


def test_good_videos_are_tagged_and_a_corrupt_one_fails_alone(media, models):
    metrics = Metrics()
    with Pipeline(settings(), models, metrics) as pipe:
        enqueued = time.time() - 2.0
        futures = {
            name: pipe.submit(VideoRequest(name, str(path), title="a game video" if name == "av3" else "",
                                           enqueued_at=enqueued))
            for name, path in media.items()
        }
        results = {}
        for name, fut in futures.items():
            try:
                results[name] = fut.result(timeout=120)
            except TagstreamError as exc:
                results[name] = exc
        assert pipe.in_flight() == 0

    err = results.pop("corrupt")
    assert isinstance(err, DecodeError) and err.reason == "decode_error"
    assert set(err.timings_s) >= {"decode", "total"}
    expected_frames = {"av3": 3, "v2": 2, "wide4": 4, "webm3": 3}
    for name, doc in results.items():
        assert doc["schema"] == 1 and doc["status"] == "tagged" and doc["reason"] is None
        assert doc["video_id"] == name and doc["model_version"] == models.model_version
        assert set(doc["timings_s"]) == set(TIMING_KEYS)
        assert set(MEDIA_KEYS) <= set(doc["media"])
        assert doc["media"]["frames"] == expected_frames[name]
        assert doc["timings_s"]["queue_wait"] >= 2.0
        assert doc["timings_s"]["total"] >= doc["timings_s"]["image"] > 0
        assert doc["finished_at"].endswith("Z")
        labels = [t["label"] for t in doc["tags"]]
        assert labels and set(labels) <= set(LABELS)
        assert [c["label"] for c in doc["categories"]] and all(0 <= t["score"] <= 1 for t in doc["tags"])
        assert len(doc["concepts"]) == 5
        for tag in doc["tags"]:
            for start, end in tag["segments"]:
                assert 0 <= start < end <= doc["media"]["duration_s"] + 1e-6
    assert results["av3"]["media"]["audio_s"] == pytest.approx(3.0, abs=0.1)
    assert results["av3"]["timings_s"]["text"] > 0 and results["v2"]["timings_s"]["text"] == 0
    assert results["wide4"]["media"]["width"] == 256

    sample = metrics.registry.get_sample_value
    assert sample("tagstream_frames_total") == 12
    assert sample("tagstream_stage_duration_seconds_count", {"stage": "total"}) == 4
    assert sample("tagstream_batch_size_sum", {"extractor": "image"}) == 12
    assert sample("tagstream_audio_seconds_total") == pytest.approx(3.0, abs=0.1)
    assert sample("tagstream_in_flight_videos") == 0


def test_image_batches_are_built_across_videos(media, models):
    # No audio, no titles; the batch size equals all frames, and the wait is long: the one image batch
    # runs when the frames of all three videos are in (size reached), never by time.
    image = RecordingImage(models.extractors.image)
    names = ["v2", "wide4", "webm3"]
    with Pipeline(settings(image_batch_size=9, batch_max_wait_s=60.0), with_image(models, image)) as pipe:
        futures = [pipe.submit(VideoRequest(n, str(media[n]))) for n in names]
        docs = [f.result(timeout=120) for f in futures]
    assert image.batches == [9]
    assert [d["media"]["frames"] for d in docs] == [2, 4, 3]
    # each video is charged its share of the one batch: proportional to its frames
    shares = np.array([d["timings_s"]["image"] for d in docs])
    assert shares / shares.sum() == pytest.approx(np.array([2, 4, 3]) / 9, abs=2e-3)


def test_cpu_batches_run_in_slices_with_the_same_results(models):
    from worker.engine.inference import ExtractorRunner

    image = RecordingImage(models.extractors.image)
    extractors = dataclasses.replace(models.extractors, image=image)
    frames = np.random.default_rng(5).integers(0, 256, (9, 224, 224, 3), dtype=np.uint8)
    with torch.inference_mode():
        whole = ExtractorRunner(extractors, torch.device("cpu"), cpu_slices={}).extract("image", frames)
        sliced = ExtractorRunner(extractors, torch.device("cpu"), cpu_slices={"image": 4}).extract("image", frames)
    assert image.batches == [9, 4, 4, 1]
    for a, b in zip(whole, sliced, strict=True):
        assert a.shape == b.shape and np.allclose(a, b, atol=1e-4)


class SecondFinishesFirst:
    """Wraps the image extractor: the first batch waits until the second one has finished."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.lock = threading.Lock()
        self.calls = 0
        self.second_done = threading.Event()
        self.finished: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, frames):
        with self.lock:
            self.calls += 1
            call = self.calls
        if call == 1:
            self.second_done.wait(60)
        out = self.inner(frames)
        self.finished.append(call)
        if call == 2:
            self.second_done.set()
        return out


def test_concurrent_batches_finishing_out_of_order_keep_each_video_in_order(media, models):
    with Pipeline(settings(inference_threads=1), models) as pipe:
        serial = pipe.submit(VideoRequest("wide4", str(media["wide4"])), features_only=True).result(timeout=120)
    image = SecondFinishesFirst(models.extractors.image)
    cfg = settings(inference_threads=2, image_batch_size=2, batch_max_wait_s=60.0)
    with Pipeline(cfg, with_image(models, image)) as pipe:
        f = pipe.submit(VideoRequest("wide4", str(media["wide4"])), features_only=True).result(timeout=120)
    assert image.finished[:2] == [2, 1]  # the second batch really finished first
    assert np.array_equal(f.image_times, serial.image_times)
    assert np.allclose(f.image, serial.image, atol=1e-4)


def test_an_extractor_failure_is_isolated_to_its_video(media, models, tmp_path):
    import PIL.Image
    from media import image_video

    magenta = (255, 0, 255)  # far from every index colour of the other clips (blue is 96 there)
    PIL.Image.new("RGB", (96, 64), magenta).save(tmp_path / "magenta.png")
    poison_video = image_video(tmp_path / "poison.mp4", tmp_path / "magenta.png", seconds=2.0, fps=10)
    image = RecordingImage(models.extractors.image, poison=magenta)
    names = {"poison": poison_video, "wide4": media["wide4"]}
    with Pipeline(settings(image_batch_size=6, batch_max_wait_s=60.0), with_image(models, image)) as pipe:
        futures = {n: pipe.submit(VideoRequest(n, str(p))) for n, p in names.items()}
        with pytest.raises(TagstreamError) as info:
            futures["poison"].result(timeout=120)
        doc = futures["wide4"].result(timeout=120)
    assert info.value.reason == "internal_error" and "poisoned" in str(info.value)
    assert doc["status"] == "tagged" and doc["media"]["frames"] == 4
    assert image.batches[0] == 6  # the mixed batch failed, then each video was retried alone
    assert sorted(image.batches[1:]) == [2, 4]


def test_deadline_passed_fails_with_timeout(media, models):
    with Pipeline(settings(), models) as pipe:
        fut = pipe.submit(VideoRequest("late", str(media["av3"]), deadline=time.monotonic() - 1.0))
        with pytest.raises(MediaTimeoutError) as info:
            fut.result(timeout=60)
    assert info.value.reason == "timeout"


def test_stop_fails_in_flight_videos_with_shutdown(media, models):
    image = RecordingImage(models.extractors.image)
    image.gate = threading.Event()
    pipe = Pipeline(settings(), with_image(models, image))
    pipe.start()
    fut = pipe.submit(VideoRequest("stuck", str(media["v2"])))
    assert image.entered.wait(60)
    assert pipe.in_flight() == 1
    pipe.stop(timeout=0.5)
    with pytest.raises(ShutdownError):
        fut.result(timeout=5)
    assert pipe.in_flight() == 0
    image.gate.set()
    with pytest.raises(ShutdownError):
        pipe.submit(VideoRequest("after", str(media["v2"]))).result(timeout=5)


def test_features_only_requests_and_documents_without_a_checkpoint(media, models):
    no_tagger = dataclasses.replace(models, tagger=None, model_version=FEATURES_ONLY)
    with Pipeline(settings(), no_tagger) as pipe:
        feats = pipe.submit(VideoRequest("av3", str(media["av3"]), title="a game video"), features_only=True)
        doc = pipe.submit(VideoRequest("v2", str(media["v2"]))).result(timeout=120)
        f = feats.result(timeout=120)
    assert isinstance(f, VideoFeatures) and f.video_id == "av3" and f.title == "a game video"
    assert f.image.shape == (3, 1280) and f.audio.shape == (3, 128)
    assert f.text.shape[1] == 384 and 3 <= f.text.shape[0] <= 50
    assert np.all(np.diff(f.image_times) > 0) and 0 <= f.image_times[0] and f.image_times[-1] <= 3.0
    assert f.duration_s == pytest.approx(3.0, abs=0.1)
    assert doc["model_version"] == FEATURES_ONLY and doc["tags"] == [] and doc["categories"] == []
    assert doc["features"] == {"image": [2, 1280], "audio": [0, 128], "text": [0, 384]}


def test_a_checkpoint_from_other_extractors_is_refused(models, tmp_path):
    ids = models.extractors.ids()
    other = {**ids, "image": {"id": "resnet50.0123456789ab", "dim": ids["image"]["dim"]}}
    save_tiny_checkpoint(tmp_path / "other", other)
    with pytest.raises(ValueError) as info:
        load_models(Settings(device="cpu", checkpoint=tmp_path / "other"))
    assert "resnet50.0123456789ab" in str(info.value) and ids["image"]["id"] in str(info.value)
