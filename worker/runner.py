"""``tagstream worker``: one long-lived tagging worker process (models resident), or a supervisor.

Start-up order: metrics/health server (``/healthz`` answers at once, ``/readyz`` 503), models,
pipeline, then the rq worker (:class:`worker.rq_worker.TagWorker`) and the uploads bridge thread.
``/readyz`` turns 200 once models are loaded and Redis answers.

``--gpus all`` (or ``--gpus N``) makes this process a supervisor: it starts one worker process per
visible GPU (``CUDA_VISIBLE_DEVICES=i``, metrics port ``metrics_port + i``), forwards SIGTERM/SIGINT
to them and exits with the worst exit status. Without GPUs ``all`` means one CPU worker.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any

import redis

from worker.config import Settings, add_settings_arguments, settings_from_args

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", default=None, help="'all' or a count: supervise one worker process per GPU.")
    parser.add_argument("--name", default=None, help="rq worker name (default: random).")
    parser.add_argument("--no-bridge", action="store_true", help="Do not bridge tagstream:uploads.")
    add_settings_arguments(parser)


def visible_gpu_count() -> int:
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:
        return 0


def supervise(argv: list[str], count: int, settings: Settings) -> int:
    """Run ``count`` worker processes (``argv`` without ``--gpus``) and wait for all of them."""
    children: list[subprocess.Popen] = []
    for i in range(count):
        env = dict(os.environ)
        if visible_gpu_count() > 0:
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        if settings.metrics_port:
            env["TAGSTREAM_METRICS_PORT"] = str(settings.metrics_port + i)
        cmd = [sys.executable, "-m", "worker.cli", "worker", *argv]
        if settings.metrics_port:
            cmd += ["--metrics-port", str(settings.metrics_port + i)]
        children.append(subprocess.Popen(cmd, env=env))
        log.info("started worker %d (pid %d)", i, children[-1].pid)

    def forward(signum: int, frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max((abs(c) for c in codes), default=0)


def _strip_gpus(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--gpus":
            skip = i + 1 < len(argv)
            continue
        if arg.startswith("--gpus="):
            continue
        if arg == "--metrics-port" or arg.startswith("--metrics-port="):
            skip = arg == "--metrics-port"
            continue
        out.append(arg)
    return out


def run_worker(
    settings: Settings, *, name: str | None = None, bridge: bool = True, models: Any = None, metrics: Any = None
) -> int:
    """Load models, start pipeline + health server + bridge, run the rq worker until it stops."""
    from worker.intake import UploadsBridge
    from worker.metrics import Metrics
    from worker.rq_worker import TagWorker

    metrics = metrics or Metrics()
    state: dict[str, Any] = {"worker": None, "models": False}

    def ready() -> bool:
        worker = state["worker"]
        return bool(state["models"] and worker is not None and worker.redis_ok)

    health = None
    if settings.metrics_port:
        from worker.health import HealthServer

        health = HealthServer(settings.metrics_host, settings.metrics_port, metrics.registry, ready).start()
    try:
        if models is None:
            from worker.models import load_models

            models = load_models(settings)
        from worker.pipeline import Pipeline

        info = models.info() if hasattr(models, "info") else {"model_version": str(models.model_version)}
        metrics.model_info.labels(
            str(info.get("model_version", "")), str(info.get("image_extractor", "")),
            str(info.get("audio_extractor", "")), str(info.get("text_extractor", "")), str(info.get("device", "")),
        ).set(1)  # fmt: skip
        pipeline = Pipeline(settings, models, metrics)
        pipeline.start()
        state["models"] = True
        connection = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
        worker = TagWorker(
            settings, connection, pipeline, model_version=str(models.model_version), metrics=metrics, name=name
        )
        state["worker"] = worker
        metrics.ready.set_function(lambda: 1.0 if ready() else 0.0)
        stop_bridge = threading.Event()
        bridge_thread = None
        if bridge:
            uploads = UploadsBridge(connection, settings, consumer=worker.name)
            bridge_thread = threading.Thread(target=uploads.run, args=(stop_bridge,), name="uploads-bridge", daemon=True)
            bridge_thread.start()
        try:
            worker.work()
        finally:
            stop_bridge.set()
            if bridge_thread is not None:
                bridge_thread.join(timeout=5)
            pipeline.stop(timeout=10)
        return 0
    finally:
        if health is not None:
            health.stop()


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.gpus:
        count = visible_gpu_count() if args.gpus == "all" else int(args.gpus)
        return supervise(_strip_gpus(sys.argv[2:]), max(1, count), settings)
    return run_worker(settings, name=args.name, bridge=not args.no_bridge)
