"""``tagstream probe FILE_OR_URL``: decode with the production decoder and print what it did as JSON.

Output keys: ``uri``, ``info`` (container, codecs, duration, size, rotation, ...), ``strategy``,
``costs`` (estimated decoded frames per strategy), ``plan`` (packets, keyframes, seeks and packets
sent to the decoder by the chosen plan, fallbacks), ``frames_decoded``, ``frames_sampled``,
``sampled_timestamps``, ``target_timestamps``, ``audio_seconds``, ``timings_s`` (open, index, video,
audio, total). On failure it prints ``{"error": reason, "message": ...}`` and exits 1. The URI policy is
not applied (this is a local tool run on the user's own input).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from worker.config import Settings, add_settings_arguments, settings_from_args
from worker.errors import TagstreamError, reason_of
from worker.media.records import AudioChunk, DecodeLimits, FrameChunk
from worker.media.sampling import SamplingPolicy
from worker.media.source import VideoSource

SETTINGS = ["fps", "max_frames", "max_duration_s", "max_pixels", "max_file_bytes", "open_timeout_s",
            "read_timeout_s", "decode_budget_s", "allow_audio_only", "hwaccel", "log_level"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("uri", help="local video file or http(s) URL")
    parser.add_argument("--no-audio", action="store_true", help="do not decode audio")
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--resize-short", type=int, default=256)
    add_settings_arguments(parser, names=SETTINGS)


def probe(uri: str, settings: Settings, *, decode_audio: bool = True, crop_size: int = 224,
          resize_short: int = 256) -> dict[str, Any]:
    """Decode ``uri`` fully with the production decoder (in this thread) and return the probe document."""
    t0 = time.perf_counter()
    policy = SamplingPolicy(fps=settings.fps, max_frames=settings.max_frames)
    timestamps: list[float] = []
    audio_samples = 0
    with VideoSource(uri, policy, DecodeLimits.from_settings(settings), crop_size=crop_size,
                     resize_short=resize_short, hwaccel=settings.hwaccel, decode_audio=decode_audio) as src:
        for chunk in src.chunks():
            if isinstance(chunk, FrameChunk):
                timestamps.extend(float(t) for t in chunk.timestamps)
            elif isinstance(chunk, AudioChunk):
                audio_samples += chunk.samples.size
        stats = src.stats
        info = src.info.to_dict()
        targets = policy.target_times(src.info.duration_s) if src.info.video_codec else []
    timings = dict(stats.timings_s)
    timings["total_s"] = time.perf_counter() - t0
    return {
        "uri": uri,
        "info": info,
        "strategy": stats.strategy,
        "hwaccel": stats.hwaccel,
        "costs": stats.costs,
        "plan": {**stats.plan, "fallbacks": stats.fallbacks},
        "frames_decoded": stats.frames_decoded,
        "frames_sampled": stats.frames_sampled,
        "sampled_timestamps": [round(t, 4) for t in timestamps],
        "target_timestamps": [round(float(t), 4) for t in targets],
        "tolerance_s": policy.tolerance_s(info["duration_s"]),
        "audio_seconds": stats.audio_seconds,
        "audio_samples_16k": audio_samples,
        "timings_s": {k: round(v, 6) for k, v in timings.items()},
    }


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    try:
        doc = probe(args.uri, settings, decode_audio=not args.no_audio, crop_size=args.crop_size,
                    resize_short=args.resize_short)
    except TagstreamError as exc:
        print(json.dumps({"error": exc.reason, "message": str(exc)}))
        return 1
    except Exception as exc:  # noqa: BLE001 - a probe must always answer in JSON
        print(json.dumps({"error": reason_of(exc), "message": f"{type(exc).__name__}: {exc}"}))
        return 1
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
