"""scripts/bench_feed.py's parts that decide what its GPU run reports: rows saved as they come, the time box,
the fusion checkpoint copy for random extractors, the decode-only rate and the utilisation readers. The whole
run is checked by ``python scripts/bench_feed.py --reduced`` (minutes), not here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from media import make_video

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_feed import Budget, Report  # noqa: E402
from bench_feed_decode import pool_rate  # noqa: E402
from bench_feed_monitor import Nvml, Sampler, proc_cpu_s  # noqa: E402
from bench_feed_worker import _checkpoint_for  # noqa: E402


def _row(clip: str, what: str, value: float | None, **extra) -> dict:
    return dict(clip=clip, kind="e2e" if what.startswith("end") else "decode", what=what, value=value,
                unit="videos/s", **extra)


def test_report_is_on_disk_after_every_row_and_judges_the_nvdec_bar(tmp_path):
    report = Report(tmp_path, {"mode": "reduced", "cpus": 2, "python": "3.x"})
    report.add(**_row("c", "decode-only, CPU pool", 4.0, sessions=2))
    saved = json.loads((tmp_path / "bench_feed.json").read_text())
    assert [r["value"] for r in saved["rows"]] == [4.0]  # a time-out after this row keeps it
    report.add(**_row("c", "decode-only, NVDEC -> host", 7.0, sessions=4))
    report.add(**_row("c", "decode-only, NVDEC -> host", 9.0, sessions=8))
    report.add(**_row("c", "end to end, CPU pool", None, notes="unavailable: no GPU"))
    md = (tmp_path / "bench_feed.md").read_text()
    assert len(json.loads((tmp_path / "bench_feed.json").read_text())["rows"]) == 4
    assert "| c | end to end, CPU pool |" in md and "unavailable" in md
    assert "best NVDEC decode-only 9.00 videos/s at 8 sessions = 2.25x the CPU pool: met" in md


def test_budget_scales_the_windows_then_skips_rows():
    budget = Budget(100.0)
    budget.plan(5.0, 40.0, rows=2)
    assert 0.99 < budget.take(5.0, 40.0) <= 1.0  # 90 s left after the reserve: both rows fit
    budget = Budget(100.0)
    budget.plan(5.0, 90.0, rows=2)
    assert budget.take(5.0, 90.0) == pytest.approx(80.0 / 180.0, abs=0.01)  # overheads are not scaled
    budget = Budget(100.0)
    budget.plan(10.0, 100.0, rows=5)
    assert budget.take(10.0, 100.0) is None  # 0.08 of the nominal windows: skipped, and out of the plan
    assert (budget.overhead, budget.windows) == (40.0, 400.0)


def test_budget_learns_from_rows_that_took_longer_than_planned():
    budget = Budget(100.0)
    budget.plan(0.0, 30.0, rows=2)
    budget.actual, budget.expected = 60.0, 20.0  # the rows so far took 3x their plan
    assert budget.take(0.0, 30.0) == pytest.approx(30.0 / 60.0, abs=0.01)


def test_checkpoint_copy_names_the_extractors_that_were_built(tmp_path):
    from model.checkpoint import load_checkpoint
    from worker.engine.models import default_checkpoint_dir

    shipped = json.loads((default_checkpoint_dir() / "config.json").read_text())["extractors"]
    assert _checkpoint_for(shipped, tmp_path) == (None, None)
    built = {**shipped, "text": {"id": "minilm-random.0123456789ab", "dim": shipped["text"]["dim"]}}
    copy, note = _checkpoint_for(built, tmp_path)
    assert copy is not None and "speed only" in note
    expected = {k: v["id"] for k, v in built.items()}
    assert load_checkpoint(copy, expected_extractors=expected).extractors["text"]["id"] == "minilm-random.0123456789ab"


def test_pool_rate_counts_the_sampled_frames_of_the_worker_decoders(tmp_path):
    clip = make_video(tmp_path / "c.mp4", seconds=4.0, size=(320, 240), audio="aac", gop=50)
    res = pool_rate(str(clip), 1, "none", measure_s=1.5, warm_timeout_s=60.0, nvml=Nvml())
    assert res.error is None and res.failures == 0
    assert set(res.used) == {"none"} and res.videos_done >= 1
    assert res.frames_per_s / res.videos_per_s == pytest.approx(4.0)  # 1 frame/s of a 4 s clip per video
    assert res.frames_decoded_per_video > 4  # a 2 s GOP: the plan decodes more than it samples
    assert res.decoder_cpu_s_per_video > 0


def test_pool_rate_reports_why_no_video_decoded(tmp_path):
    bad = tmp_path / "not-a-video.mp4"
    bad.write_bytes(b"\0" * 4096)
    res = pool_rate(str(bad), 1, "none", measure_s=0.5, warm_timeout_s=30.0, nvml=Nvml())
    assert res.videos_per_s is None and res.failures >= 1 and res.error


def test_utilisation_without_nvml_and_process_cpu():
    nvml = Nvml()
    if nvml.error is None:
        pytest.skip("this machine has NVML")
    assert nvml.decoder_percent() is None and nvml.sm_percent() is None
    sampler = Sampler(nvml)
    sampler.start()
    sum(i * i for i in range(200_000))
    util = sampler.stop()
    assert util.decoder_percent is None and 0.0 <= util.cpu_percent <= 100.0
    assert util.describe()["decoder"] == "unavailable"
    assert proc_cpu_s(1 << 22) == 0.0  # no such process
