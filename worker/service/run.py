"""``tagstream worker``: one long-lived tagging worker process (models resident), or a supervisor.

Start-up order: the pre-flight check (:func:`preflight`: settings, device, a Redis PING; a failure
ends the command with one line and exit 2 or 69 before anything is bound or loaded), metrics/health
server (``/healthz`` answers at once, ``/readyz`` 503), models, pipeline, then the rq worker
(:class:`worker.jobs.worker.TagWorker`) and the uploads bridge thread
(:class:`worker.jobs.uploads.UploadsBridge`).
``/readyz`` turns 200 once models are loaded and Redis answers. On CUDA the worker exports
``tagstream_gpu_memory_bytes`` (see :meth:`worker.metrics.Metrics.track_gpu_memory`). SIGTERM/SIGINT
while models load end the process at once (by the signal; nothing is in flight yet), and before the rq
worker runs make it return 0 (:class:`EarlyStop`).

``--gpus`` (or ``--workers-per-gpu`` above 1) makes this command a supervisor instead
(:mod:`worker.service.supervisor`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

from worker.cli_errors import UsageError
from worker.config import Settings, add_settings_arguments, settings_from_args
from worker.jobs.connection import connect, redis_address, redis_client, redis_from_url
from worker.jobs.liveness import Liveness
from worker.jobs.uploads import UploadsBridge
from worker.jobs.worker import TagWorker
from worker.metrics import Metrics
from worker.service.doctor import log_startup_warnings
from worker.service.health import HealthServer
from worker.service.supervisor import Supervisor, child_flags, child_specs, devices_for, share_cpu_budget

if TYPE_CHECKING:
    from worker.engine.models import LoadedModels

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpus", default=None,
        help="'all', a count N, or device ids like 0,2: supervise --workers-per-gpu worker processes per GPU.",
    )  # fmt: skip
    parser.add_argument("--name", default=None, help="rq worker name (default: random).")
    parser.add_argument("--no-bridge", action="store_true", help="Do not bridge tagstream:uploads.")
    parser.add_argument(
        "--no-redis-check", action="store_true",
        help="Skip the start-up Redis PING (the URL is still checked): load the models, then wait for Redis. "
        "The --gpus supervisor checks once and passes this to its workers, which may restart during an outage.",
    )  # fmt: skip
    add_settings_arguments(parser)


class EarlyStop:
    """SIGTERM/SIGINT until the rq worker installs its own handlers.

    While models load (:meth:`loading`) both signals keep their default action: the kernel ends the
    process at once, whatever its main thread is doing. Nothing is in flight or registered yet. A
    Python handler would run only when the main thread next executes bytecode, which one long C call
    (an import, a weights loader) can delay indefinitely; a CI run saw two loading workers ignore a
    SIGTERM for 30 s that way. The exit status is then -SIGTERM, which the supervisor counts as a clean
    stop of a signal it forwarded (143 in a shell). As PID 1, where the kernel drops default-action
    signals, a Python handler exits with status 0 instead. After loading (:meth:`loaded`) the handler
    only records the request, which :func:`run_worker` checks before starting work."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.hard = True

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested.set()
        if self.hard:
            os.write(2, f"{signal.Signals(signum).name} while loading models: exiting\n".encode())
            os._exit(0)

    def loading(self) -> None:
        handler = self if os.getpid() == 1 else signal.SIG_DFL
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, handler)

    def loaded(self) -> None:
        self.hard = False
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self)


@dataclass
class _Readiness:
    """``/readyz``: models loaded, and the rq worker's last Redis call succeeded."""

    models_loaded: bool = False
    worker: TagWorker | None = None

    def ready(self) -> bool:
        return self.models_loaded and self.worker is not None and self.worker.redis_ok


def run_worker(
    settings: Settings, *, name: str | None = None, bridge: bool = True, models: LoadedModels | None = None,
    metrics: Metrics | None = None,
) -> int:
    """Load models (unless given), start pipeline + health server + bridge, run the rq worker until it
    stops."""
    # The engine (torch, the models) is imported here, in a worker process only: the --gpus supervisor
    # runs this module too, and loads neither torch nor a model.
    from worker.engine.models import load_models
    from worker.engine.pipeline import Pipeline

    metrics = metrics or Metrics()
    state = _Readiness()

    liveness = Liveness(settings.liveness_timeout_s)  # /healthz: beaten by the rq worker's loop
    early = EarlyStop()
    in_main_thread = threading.current_thread() is threading.main_thread()  # the rq worker installs its own later
    if in_main_thread:
        early.loading()
    health = pipeline = None
    try:
        if settings.metrics_port:
            try:
                health = HealthServer(settings.metrics_host, settings.metrics_port, metrics.registry, state.ready,
                                      liveness=liveness).start()  # fmt: skip
            except OSError as exc:  # the port is taken, or the host is not an address of this machine
                raise UsageError(f"cannot listen on {settings.metrics_host}:{settings.metrics_port} "
                                 f"({exc.strerror or exc})", setting="metrics_port") from exc  # fmt: skip
        if models is None:
            models = load_models(settings)
        info = models.info()
        metrics.model_info.labels(
            info["model_version"], info["image_extractor"], info["audio_extractor"], info["text_extractor"],
            info["device"],
        ).set(1)  # fmt: skip
        if metrics.track_gpu_memory(models.device):
            log.info("exporting GPU memory of %s", models.device)
        if in_main_thread:
            early.loaded()  # from here on, a stop request is honoured by returning normally
        pipeline = Pipeline(settings, models, metrics)
        pipeline.start()
        state.models_loaded = True
        connection = redis_from_url(settings.redis_url, health_check_interval=30)
        worker = TagWorker(
            settings, connection, pipeline, model_version=str(models.model_version), metrics=metrics, name=name,
            liveness=liveness,
        )
        state.worker = worker
        metrics.ready.set_function(lambda: 1.0 if state.ready() else 0.0)
        if early.requested.is_set():
            log.info("stop requested during start-up: exiting (nothing was in flight)")
            return 0
        stop_bridge = threading.Event()
        bridge_thread = None
        if bridge:
            uploads = UploadsBridge(connection, settings, consumer=worker.name, metrics=metrics)
            bridge_thread = threading.Thread(target=uploads.run, args=(stop_bridge,), name="uploads-bridge", daemon=True)
            bridge_thread.start()
        try:
            worker.work()
        finally:
            stop_bridge.set()
            if bridge_thread is not None:
                bridge_thread.join(timeout=5)
        return 0
    finally:
        if pipeline is not None:
            pipeline.stop(timeout=10)
        if health is not None:
            health.stop()


def check_device(device: str, *, one_gpu_each: bool = False) -> None:
    """Raise :class:`UsageError` when torch cannot give this process ``device`` (a validated Settings
    value). ``auto`` and ``cpu`` always work and import nothing. ``cuda``/``cuda:N`` need a CUDA device
    (N below torch's device count); ``mps`` needs MPS. ``one_gpu_each``: the check runs in a supervisor
    whose children each see exactly one GPU (as ``cuda:0``), so only the index is checked."""
    if device in ("auto", "cpu"):
        return
    if one_gpu_each:
        if device not in ("cuda", "cuda:0"):
            raise UsageError("each supervised worker sees its one GPU as cuda:0; use --device cuda",
                             setting="device", value=device)  # fmt: skip
        return
    import torch  # only for a named accelerator: "auto" and "cpu" start without importing it here

    if device == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError("torch sees no MPS device; use --device cpu or auto", setting="device", value=device)
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UsageError("torch sees no CUDA device (check the driver and CUDA_VISIBLE_DEVICES); use --device cpu "
                         "or auto", setting="device", value=device)  # fmt: skip
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise UsageError(f"torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}", setting="device",
                         value=device)  # fmt: skip


def preflight(settings: Settings, devices: list[str | None] | None = None, *, ping: bool = True) -> None:
    """What a worker (or a ``--gpus`` supervisor, whose children are ``workers_per_gpu`` for each of
    ``devices``) checks before it binds the metrics port or loads a model: the metrics port range (one port
    per child), the device (:func:`check_device`) and Redis (:func:`worker.jobs.connection.connect`: the URL,
    then a PING with a short timeout; without ``ping`` only the URL). Raises :class:`UsageError` or
    :class:`worker.cli_errors.ServiceUnavailable`."""
    children = len(devices) * settings.workers_per_gpu if devices else 1
    if settings.metrics_port and not 0 < settings.metrics_port + children - 1 <= 65535:
        raise UsageError("not a TCP port (1-65535, or 0 for no metrics server)", setting="metrics_port",
                         value=settings.metrics_port)  # fmt: skip
    check_device(settings.device, one_gpu_each=bool(devices) and devices != [None])
    if not ping:
        redis_client(settings).close()
        return
    connection = connect(settings)
    log.info("pre-flight: Redis at %s answers PING", redis_address(connection))
    connection.close()


def run(args: argparse.Namespace) -> int:
    """``tagstream worker``: the pre-flight check, then one worker, or with ``--gpus`` (``--workers-per-gpu``
    above 1 alone means ``--gpus all``) the supervisor."""
    settings = settings_from_args(args)
    devices = None
    if args.gpus or settings.workers_per_gpu > 1:
        try:
            devices = devices_for(args.gpus or "all")
        except SystemExit as exc:  # devices_for's message names --gpus
            raise UsageError(str(exc.code)) from exc
    preflight(settings, devices, ping=not args.no_redis_check)
    if devices is not None:
        specs = child_specs(devices, settings.workers_per_gpu, settings.metrics_port, args.name)
        share = share_cpu_budget(len(specs), settings.resolved_cpu_budget())
        flags = [*child_flags(args), "--no-redis-check"]  # checked here; a restart may come during an outage
        return Supervisor(flags, specs, settings, share).run()
    log_startup_warnings(settings)  # what `tagstream doctor` would warn about, without loading models
    return run_worker(settings, name=args.name, bridge=not args.no_bridge)
