"""``hwaccel=auto`` takes NVDEC only when measured faster (worker/media/hwaccel.py), the engine's use of the
choice and the decode thread count with NVDEC, and what ``tagstream doctor`` says; all without a GPU.

The choice is tested on probe records built here (among them the H200 figures of BENCHMARKS.md "GPU"), the
probe itself as the real subprocess on this machine, where NVDEC cannot decode."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from media import make_video

from worker.config import NVDEC_MIN_SESSIONS, Settings
from worker.engine.decoding import DecodeThreads, resolve_hwaccel
from worker.media.hwaccel import (
    DecodeMeasurement,
    HwaccelChoice,
    HwaccelProbe,
    choose_hwaccel,
    make_probe_clip,
    measure_decode,
    run_probe,
)
from worker.media.sampling import SamplingPolicy
from worker.service.doctor_device import check_nvdec

GPU = torch.cuda.is_available()


def alone(hwaccel: str, wall_s: float, cpu_s: float, used: str | None = None) -> DecodeMeasurement:
    return DecodeMeasurement(hwaccel, videos=1, wall_s=wall_s, cpu_s=cpu_s, frames_decoded=363.0,
                             used=used or hwaccel)  # fmt: skip


def at_once(streams: int, videos_per_s: float, cpu_s: float, used: str = "cuda") -> DecodeMeasurement:
    """NVDEC with ``streams`` sessions delivering ``videos_per_s`` together: ``wall_s`` per video is
    streams / rate (the probe's definition)."""
    return DecodeMeasurement("cuda", streams=streams, videos=2 * streams, wall_s=streams / videos_per_s,
                             cpu_s=cpu_s, frames_decoded=363.0, used=used)  # fmt: skip


# BENCHMARKS.md "GPU", H200, 16 cores: one video alone 1.621 s wall / 1.56 s CPU in software, 0.762 s / 0.61 s
# with NVDEC; 16 decoder processes with NVDEC: 3.07 videos/s at 21% of 16 cores (16 * 0.21 / 3.07 s CPU each)
H200_SOFTWARE = alone("none", 1.621, 1.56)
H200_NVDEC_ALONE = alone("cuda", 0.762, 0.61)
H200_NVDEC_16 = at_once(16, 3.07, 16 * 0.21 / 3.07)


class Probe:
    """A probe callable returning ``result``; counts its calls (the choice must not probe needlessly)."""

    def __init__(self, result: HwaccelProbe) -> None:
        self.result, self.calls = result, 0

    def __call__(self) -> HwaccelProbe:
        self.calls += 1
        return self.result


def choose(result: HwaccelProbe, *, setting: str = "auto", gpu: bool = True, cuda_listed: bool = True,
           cpu_budget: int = 16, sessions: int = 16) -> tuple[str, str, Probe]:
    probe = Probe(result)
    choice = choose_hwaccel(setting, gpu=gpu, cuda_listed=cuda_listed, probe=probe, cpu_budget=cpu_budget,
                            sessions=sessions)  # fmt: skip
    assert choice.probe is (result if probe.calls else None)
    return choice.hwaccel, choice.reason, probe


NVDEC_WINS = HwaccelProbe(software=H200_SOFTWARE, cuda=H200_NVDEC_ALONE, cuda_sessions=at_once(16, 20.0, 0.3))


# --- the choice --------------------------------------------------------------------------------------------


def test_none_and_cuda_are_the_operators_and_never_probe():
    hwaccel, reason, probe = choose(NVDEC_WINS, setting="none")
    assert (hwaccel, probe.calls) == ("none", 0) and "operator" in reason
    never = HwaccelProbe(error="must not run")
    hwaccel, reason, probe = choose(never, setting="cuda", gpu=False, cuda_listed=False)
    assert (hwaccel, probe.calls) == ("cuda", 0) and "operator" in reason


def test_auto_without_gpu_or_cuda_hwdevice_or_probe_is_software_without_probing():
    hwaccel, reason, probe = choose(NVDEC_WINS, gpu=False)
    assert (hwaccel, probe.calls) == ("none", 0) and "no GPU" in reason
    hwaccel, reason, probe = choose(NVDEC_WINS, cuda_listed=False)
    assert (hwaccel, probe.calls) == ("none", 0) and "cuda hwdevice" in reason
    choice = choose_hwaccel("auto", gpu=True, cuda_listed=True, probe=None, cpu_budget=16, sessions=16)
    assert choice.hwaccel == "none" and choice.probe is None


def test_the_h200_figures_choose_software():
    """NVDEC twice as fast alone, 3.7x slower with 16 sessions: 3.07 videos/s against 16 / 1.56 = 10.3."""
    hwaccel, reason, probe = choose(HwaccelProbe(software=H200_SOFTWARE, cuda=H200_NVDEC_ALONE,
                                                 cuda_sessions=H200_NVDEC_16))  # fmt: skip
    assert (hwaccel, probe.calls) == ("none", 1)
    assert "estimated 3.07 videos/s with NVDEC (16 sessions) against 10.26 in software (16 CPUs)" in reason


def test_one_video_alone_is_not_extrapolated_to_many_sessions():
    hwaccel, reason, _ = choose(HwaccelProbe(software=H200_SOFTWARE, cuda=H200_NVDEC_ALONE))
    assert hwaccel == "none" and "measured with 1 sessions, not the 16" in reason
    # one session is what was measured: then it counts (1 / 0.762 = 1.3 videos/s against 16 / 1.56)
    hwaccel, reason, _ = choose(HwaccelProbe(software=H200_SOFTWARE, cuda=H200_NVDEC_ALONE), sessions=1)
    assert hwaccel == "none" and "estimated 1.31 videos/s" in reason


def test_nvdec_measured_faster_with_all_sessions_is_chosen():
    hwaccel, reason, probe = choose(NVDEC_WINS)
    assert (hwaccel, probe.calls) == ("cuda", 1)
    assert "estimated 20.00 videos/s with NVDEC (16 sessions) against 10.26 in software" in reason


def test_nvdec_must_win_by_the_margin_and_its_cpu_counts():
    software = alone("none", 1.6, 1.6)  # 16 CPUs / 1.6 s = 10 videos/s
    close = HwaccelProbe(software=software, cuda=H200_NVDEC_ALONE, cuda_sessions=at_once(16, 10.5, 0.1))
    assert choose(close)[0] == "none"  # 5% faster: not enough
    clear = HwaccelProbe(software=software, cuda=H200_NVDEC_ALONE, cuda_sessions=at_once(16, 11.5, 0.1))
    assert choose(clear)[0] == "cuda"  # 15% faster
    # the sessions could do 40 videos/s, but each still costs 1.4 s of CPU: 16 / 1.4 = 11.4 videos/s at most
    cpu_bound = HwaccelProbe(software=software, cuda=H200_NVDEC_ALONE, cuda_sessions=at_once(16, 40.0, 1.4))
    hwaccel, reason, _ = choose(cpu_bound)
    assert hwaccel == "cuda" and "estimated 11.43 videos/s" in reason
    cpu_heavy = HwaccelProbe(software=software, cuda=H200_NVDEC_ALONE, cuda_sessions=at_once(16, 40.0, 1.5))
    hwaccel, reason, _ = choose(cpu_heavy)
    assert hwaccel == "none" and "estimated 10.67 videos/s" in reason  # 16 / 1.5: 7% faster


@pytest.mark.parametrize(
    ("result", "why"),
    [
        (HwaccelProbe(error="timed out after 20 s"), "the probe failed (timed out after 20 s)"),
        (HwaccelProbe(software=DecodeMeasurement("none", error="DecodeError: x"), cuda=H200_NVDEC_ALONE,
                      cuda_sessions=H200_NVDEC_16), "software decoding was not measured"),
        (HwaccelProbe(software=H200_SOFTWARE, cuda=DecodeMeasurement("cuda", error="OSError: no device")),
         "NVDEC failed in the probe (OSError: no device)"),
        (HwaccelProbe(software=H200_SOFTWARE, cuda=alone("cuda", 1.6, 1.55, used="none")),
         "NVDEC fell back to software in the probe (decoders used none)"),
        (HwaccelProbe(software=H200_SOFTWARE, cuda=H200_NVDEC_ALONE,
                      cuda_sessions=at_once(16, 20.0, 0.3, "mixed")), "decoders used mixed"),
    ],
)  # fmt: skip
def test_a_probe_that_failed_or_fell_back_means_software(result, why):
    hwaccel, reason, probe = choose(result)
    assert (hwaccel, probe.calls) == ("none", 1) and why in reason, reason


def test_the_record_survives_json():
    assert HwaccelProbe.from_dict(NVDEC_WINS.to_dict()) == NVDEC_WINS
    assert HwaccelProbe.from_dict(HwaccelProbe(error="x").to_dict()) == HwaccelProbe(error="x")


# --- the probe, for real -----------------------------------------------------------------------------------


def on_a_gpu(result: HwaccelProbe, *, sessions: int) -> HwaccelChoice:
    """What ``auto`` would choose from ``result`` on a two-CPU GPU machine."""
    return choose_hwaccel(
        "auto", gpu=True, cuda_listed=True, probe=lambda: result, cpu_budget=2, sessions=sessions
    )


def test_the_probe_subprocess_measures_software_and_finds_no_nvdec_here():
    result = run_probe(streams=2, timeout_s=300)
    assert result.error is None, result
    soft = result.software
    assert soft is not None and soft.error is None and soft.used == "none", soft
    assert soft.videos == 1 and soft.wall_s > 0 and soft.cpu_s > 0 and soft.frames_decoded >= 8
    assert result.clip.startswith("generated 1280x720 H.264")
    choice = on_a_gpu(result, sessions=2)
    if GPU:  # on a GPU machine the same test shows NVDEC decoding, alone and with two sessions
        assert result.nvdec_decoded() and result.cuda_sessions is not None
        assert result.cuda_sessions.videos == 4
        return
    cuda = result.cuda
    assert cuda is not None and (cuda.error is not None or cuda.used == "none"), cuda
    assert result.cuda_sessions is None and not result.nvdec_decoded()
    assert choice.hwaccel == "none", choice.reason
    assert "fell back" in choice.reason or "failed" in choice.reason, choice.reason


def test_a_probe_past_its_time_is_killed_and_means_software():
    result = run_probe(streams=1, timeout_s=0.5)
    assert result.error == "timed out after 0.5 s"
    choice = on_a_gpu(result, sessions=1)
    assert choice.hwaccel == "none" and "timed out" in choice.reason


def test_a_clip_that_does_not_decode_is_an_error_in_the_record(tmp_path):
    result = run_probe(streams=1, clip=str(tmp_path / "missing.mp4"), timeout_s=300)
    assert result.error is None and result.software is not None and result.cuda is not None
    assert result.software.error.startswith("NotFoundError") and result.cuda.error.startswith("NotFoundError")
    choice = on_a_gpu(result, sessions=1)
    assert choice.hwaccel == "none" and "software decoding was not measured" in choice.reason


def test_several_sessions_are_measured_at_once(tmp_path):
    """The several-sessions measurement (on NVDEC only with a GPU) run in software: its figures per video."""
    clip = str(make_probe_clip(tmp_path / "probe.mp4", seconds=3.0))
    m = measure_decode(clip, "none", sampling=SamplingPolicy(), streams=2, rounds=2)
    assert m.error is None, m
    assert (m.streams, m.videos, m.used) == (2, 4, "none")
    assert m.wall_s > 0 and m.cpu_s > 0 and m.frames_decoded >= 3


# --- the engine and the decode thread count ----------------------------------------------------------------


def test_decode_threads_default_to_at_least_eight_nvdec_sessions():
    cpus = Settings().resolved_cpu_budget()
    assert Settings().resolved_decode_threads() == cpus
    assert Settings().resolved_decode_threads(hwaccel="none") == cpus
    assert Settings().resolved_decode_threads(hwaccel="cuda") == max(NVDEC_MIN_SESSIONS, cpus) >= 8
    assert Settings(decode_threads=3).resolved_decode_threads(hwaccel="cuda") == 3


def decode_threads(**settings) -> DecodeThreads:
    return DecodeThreads(Settings(**settings), device_type=settings.get("device", "cpu"), crop_size=224,
                         resize_short=256, emit=lambda event: 0.0, forget=lambda video: None,
                         stopping=threading.Event())  # fmt: skip


def test_the_engine_sizes_its_decoders_by_the_choice(caplog):
    cpus = Settings().resolved_cpu_budget()
    with caplog.at_level(logging.INFO, logger="worker.engine.decoding"):
        cuda = decode_threads(device="cpu", hwaccel="cuda")
    assert cuda.hwaccel == "cuda" and cuda.count == max(NVDEC_MIN_SESSIONS, cpus)
    assert cuda.hwaccel_choice.probe is None
    assert "hwaccel cuda: hwaccel=cuda: NVDEC, set by the operator" in caplog.text
    auto = decode_threads(device="cpu", hwaccel="auto")
    assert (auto.hwaccel, auto.count, auto.hwaccel_choice.probe) == ("none", cpus, None)
    assert decode_threads(device="cpu", hwaccel="cuda", decode_threads=2).count == 2


def test_auto_on_a_gpu_worker_runs_the_probe(caplog):
    """The engine's own path: a GPU device type runs the real probe (here it finds no NVDEC, or runs past its
    20 s on a busy machine: software either way) and logs the choice and the figures."""
    with caplog.at_level(logging.INFO, logger="worker.engine.decoding"):
        choice = resolve_hwaccel(Settings(hwaccel="auto", decode_threads=2), "cuda")
    assert choice.probe is not None
    if not GPU:
        assert choice.hwaccel == "none", choice.reason
    assert f"hwaccel {choice.hwaccel}: auto:" in caplog.text and "hwaccel probe" in caplog.text


def test_hwaccel_cuda_without_a_gpu_tags_a_clip_in_software_through_the_decoder_processes(tmp_path):
    from worker.tools.tag_file import tag_file

    clip = make_video(tmp_path / "cuda.mp4", seconds=3.0, fps=10, audio="aac")
    settings = Settings(device="cpu", hwaccel="cuda", decode_threads=1)
    assert settings.decode_isolation
    doc = tag_file(clip, settings=settings)
    assert doc["status"] == "tagged" and doc["media"]["frames"] == 3, doc
    assert doc["decode"]["hwaccel"] == ("cuda" if GPU else "none")


# --- tagstream doctor --------------------------------------------------------------------------------------


@pytest.mark.skipif(GPU, reason="the lines of a machine without a GPU")
def test_doctor_says_there_is_no_gpu_and_what_each_setting_does():
    line = check_nvdec(Settings(hwaccel="auto"), probe_device=True)
    assert line.status == "OK"
    assert line.detail.startswith("no GPU: hwaccel=auto decodes in software (no probe run)")
    line = check_nvdec(Settings(hwaccel="cuda"), probe_device=True)
    assert line.status == "WARN" and "every video tries NVDEC" in line.detail
    assert "TAGSTREAM_HWACCEL=auto or none" in line.detail
    line = check_nvdec(Settings(hwaccel="none"), probe_device=True)
    assert line.status == "OK" and line.detail.startswith("off (hwaccel=none)")
