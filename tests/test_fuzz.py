"""CI-sized mutation fuzzing (scripts/fuzz_decode.py): no decoder crash, no hang past the decode budget,
bounded decoder memory; and the mutators really change what the decoder sees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import fuzz_decode  # noqa: E402


def test_mutators_are_deterministic_and_change_the_bytes(tmp_path):
    seeds = fuzz_decode.make_seeds(tmp_path / "seeds")
    names = sorted(seeds)
    assert len(names) == len(fuzz_decode.SEEDS)
    # the seed clips themselves are byte for byte the same on every run (Matroska/WebM used to carry a
    # random segment UID, so a recipe rebuilt a different mutant and its outcome could change between runs)
    assert fuzz_decode.make_seeds(tmp_path / "again") == seeds
    changed = 0
    for index in range(40):
        seed, muts, rng_seed = fuzz_decode.recipe(index, names, 7)
        assert fuzz_decode.recipe(index, names, 7) == (seed, muts, rng_seed)
        a = fuzz_decode.build(seeds[seed], muts, rng_seed)
        assert a == fuzz_decode.build(seeds[seed], muts, rng_seed)  # a finding rebuilds exactly
        changed += a != seeds[seed]
    assert changed >= 38
    rng = np.random.default_rng(1)
    mp4 = seeds["h264_aac.mp4"]
    for mutator in fuzz_decode.MUTATORS:
        assert fuzz_decode.mutate(mp4, mutator, rng) != mp4, mutator
    assert fuzz_decode._size_fields(mp4) and fuzz_decode._size_fields(seeds["mjpeg.avi"])
    assert fuzz_decode._size_fields(seeds["h264.mkv"])


def test_ci_fuzz_run(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fuzz_decode.py"), "--count", "48", "--workers", "2",
         "--decode-budget-s", "10", "--workdir", str(tmp_path / "w"), "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["mutants"] == 48 == sum(report["outcomes"].values())
    assert report["crashes"] == 0 and report["hard_timeouts"] == 0 and report["over_budget"] == 0
    assert report["internal_errors"] == 0, report["findings"]  # every refusal carries a real reason
    assert report["time_s"]["max"] <= report["hard_deadline_s"]
    assert 0 < report["decoder_peak_rss_mb"] < 1024
    # the corpus exercises both paths: mutants that still decode and mutants that are refused with a reason
    assert report["outcomes"].get("tagged", 0) > 0
    assert sum(v for k, v in report["outcomes"].items() if k != "tagged") > 0
    assert "## Mutation fuzzing" in proc.stdout


def test_finding_282_stream_without_decoder_is_ignored(tmp_path):
    """Full run finding (seed h264_aac.mp4, bitflip + boxsize): the audio stream's codec is unknown to
    FFmpeg (no codec context). It used to raise AttributeError (internal_error); now the stream counts as
    absent and the video is tagged from its frames."""
    from worker.config import Settings
    from worker.media.records import DecodeLimits
    from worker.media.sampling import SamplingPolicy
    from worker.media.source import VideoSource

    seeds = fuzz_decode.make_seeds(tmp_path / "seeds")
    path = tmp_path / "m00282.mp4"
    path.write_bytes(fuzz_decode.build(seeds["h264_aac.mp4"], ["bitflip", "boxsize"], 426624892))
    import av

    with av.open(str(path)) as c:
        assert [s.codec_context for s in c.streams.audio] == [None]  # the case this test is about
    with VideoSource(str(path), SamplingPolicy(), DecodeLimits.from_settings(Settings())) as src:
        frames = sum(len(chunk.timestamps) for chunk in src.chunks() if hasattr(chunk, "timestamps"))
    assert frames > 0 and src.info.has_audio is False and src.info.video_codec == "h264"
