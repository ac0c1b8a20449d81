"""``tagstream worker``: one long-lived tagging worker process (models resident), or a supervisor.

Start-up order: the pre-flight check (:func:`preflight`: settings, device, a Redis PING; a failure
ends the command with one line and exit 2 or 69 before anything is bound or loaded), metrics/health
server (``/healthz`` answers at once, ``/readyz`` 503), models, pipeline, then the rq worker
(:class:`worker.rq_worker.TagWorker`) and the uploads bridge thread.
``/readyz`` turns 200 once models are loaded and Redis answers. On CUDA the worker exports
``tagstream_gpu_memory_bytes`` (see :meth:`worker.metrics.Metrics.track_gpu_memory`). SIGTERM/SIGINT
while models load end the process at once (by the signal; nothing is in flight yet), and before the rq
worker runs make it return 0 (:class:`EarlyStop`).

``--gpus`` makes this process a supervisor (:class:`Supervisor`) that runs one worker process per GPU:

* ``--gpus all``: every visible GPU (the entries of ``CUDA_VISIBLE_DEVICES`` when set, else
  ``0..torch.cuda.device_count()-1``); without GPUs, one worker (on CPU).
* ``--gpus N``: the first N visible GPUs (an error when fewer are visible).
* ``--gpus 0,2`` (ids or GPU UUIDs): exactly these, passed through unchecked as
  ``CUDA_VISIBLE_DEVICES`` would take them. With ``--device cpu`` the children run on CPU, which is
  how the supervisor is tested on machines without GPUs.

Child ``i`` gets ``CUDA_VISIBLE_DEVICES=<device i>``, metrics port ``metrics_port + i`` (0 stays 0)
and, when ``--name`` is given, the rq worker name ``<name>-<i>`` (``<name>-<i>.<restarts>`` after a
restart: rq refuses a name whose previous holder has not expired yet). Every other flag and the
environment are passed through. Children run in their own session, so a terminal's Ctrl-C reaches
only the supervisor, which forwards each SIGTERM/SIGINT it gets to every child (the first starts the
children's graceful shutdown, a second hands their jobs back at once); on Linux a child also gets
SIGTERM if the supervisor dies. A child that exits while the supervisor is not stopping is restarted
(a ``max_jobs`` recycle at once; a crash or the OOM killer after 1 s, doubling up to 30 s while it
keeps failing within :data:`QUICK_EXIT_S` of its start); after :data:`MAX_QUICK_EXITS` such quick
failures in a row the supervisor stops the others and exits with the child's status (a configuration
error should not loop forever). In ``--burst`` mode a child that exits 0 is done. The supervisor
exits with the worst status of its children's last runs (0 when all stopped cleanly).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from worker.cli_errors import UsageError
from worker.config import Settings, add_settings_arguments, settings_from_args
from worker.doctor import log_startup_warnings

log = logging.getLogger(__name__)

QUICK_EXIT_S = 60.0
MAX_QUICK_EXITS = 5
MAX_BACKOFF_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpus", default=None,
        help="'all', a count N, or device ids like 0,2: supervise one worker process per GPU.",
    )  # fmt: skip
    parser.add_argument("--name", default=None, help="rq worker name (default: random).")
    parser.add_argument("--no-bridge", action="store_true", help="Do not bridge tagstream:uploads.")
    parser.add_argument(
        "--no-redis-check", action="store_true",
        help="Skip the start-up Redis PING (the URL is still checked): load the models, then wait for Redis. "
        "The --gpus supervisor checks once and passes this to its workers, which may restart during an outage.",
    )  # fmt: skip
    add_settings_arguments(parser)


# --- supervisor ------------------------------------------------------------------------------------
def visible_devices() -> list[str]:
    """Device ids visible to this process: ``CUDA_VISIBLE_DEVICES`` entries when it is set (as
    written, so UUIDs stay UUIDs), else ``0..n-1`` for torch's device count (imports torch)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no CUDA runtime means no GPUs
        return []


def devices_for(spec: str) -> list[str | None]:
    """The device of each child for a ``--gpus`` value (see module docstring); ``[None]`` is one
    worker without a device assignment."""
    spec = spec.strip()
    if spec == "all":
        return list(visible_devices()) or [None]
    if spec.isdigit():
        count, visible = int(spec), visible_devices()
        if count < 1:
            raise SystemExit("--gpus N needs N >= 1")
        if count > len(visible):
            raise SystemExit(f"--gpus {count}: only {len(visible)} GPU(s) visible")
        return list(visible[:count])
    ids = [d.strip() for d in spec.split(",") if d.strip()]
    if not ids:
        raise SystemExit(f"--gpus {spec!r}: expected 'all', a count or device ids")
    return list(ids)


def child_flags(args: argparse.Namespace) -> list[str]:
    """The worker flags given on the supervisor's command line, for its children, without ``--gpus``,
    ``--name`` and ``--metrics-port`` (set per child). ``TAGSTREAM_*`` variables reach the children
    through the environment."""
    out: list[str] = []
    for key, value in vars(args).items():
        name = key.removeprefix("setting_")
        if not key.startswith("setting_") or value is None or name == "metrics_port":
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, str(value)]
    if getattr(args, "no_bridge", False):
        out.append("--no-bridge")
    return out


def _die_with_parent() -> None:
    """In the child before exec: own session (terminal signals go to the supervisor only) and, on
    Linux, SIGTERM when the supervisor dies."""
    os.setsid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except Exception:  # noqa: BLE001 - best effort
            pass


@dataclass
class Child:
    index: int
    device: str | None
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    quick_exits: int = 0
    restart_at: float | None = None
    done: bool = False
    codes: list[int] = field(default_factory=list)


class Supervisor:
    """Runs and restarts one ``tagstream worker`` process per device (see module docstring)."""

    def __init__(self, flags: list[str], devices: list[str | None], settings: Settings, name: str | None = None) -> None:
        self.flags = list(flags)
        self.settings = settings
        self.name = name
        self.children = [Child(i, d) for i, d in enumerate(devices)]
        self.stopping = threading.Event()
        self.signals: list[int] = []

    def command(self, child: Child) -> tuple[list[str], dict[str, str]]:
        cmd = [sys.executable, "-m", "worker.cli", "worker", *self.flags]
        port = self.settings.metrics_port + child.index if self.settings.metrics_port else 0
        cmd += ["--metrics-port", str(port)]
        if self.name:
            suffix = f".{child.restarts}" if child.restarts else ""
            cmd += ["--name", f"{self.name}-{child.index}{suffix}"]
        env = dict(os.environ)
        if child.device is not None:
            env["CUDA_VISIBLE_DEVICES"] = child.device
        return cmd, env

    def start(self, child: Child) -> None:
        cmd, env = self.command(child)
        child.process = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)  # noqa: PLW1509
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("worker %d started (pid %d, device %s)", child.index, child.process.pid, child.device or "-")

    def forward(self, signum: int, frame: Any = None) -> None:
        """Signal handler: remember the stop and pass the signal to every running child."""
        self.stopping.set()
        self.signals.append(signum)
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                try:
                    child.process.send_signal(signum)
                except ProcessLookupError:
                    pass

    def _on_exit(self, child: Child, code: int) -> None:
        child.codes.append(code)
        uptime = time.monotonic() - child.started_at
        if self.stopping.is_set() or (self.settings.burst and code == 0):
            how = f"by signal {-code} ({signal.strsignal(-code)})" if code < 0 else f"with status {code}"
            log.info("worker %d (pid %d) ended %s", child.index, child.process.pid if child.process else -1, how)
            child.done = True
            return
        # a clean exit (a max_jobs recycle) is restarted at once and never counts as a crash
        child.quick_exits = child.quick_exits + 1 if code != 0 and uptime < QUICK_EXIT_S else 0
        if child.quick_exits >= MAX_QUICK_EXITS:
            log.error("worker %d died %d times within %.0f s of starting (last status %s): giving up",
                      child.index, child.quick_exits, QUICK_EXIT_S, code)  # fmt: skip
            child.done = True
            self.forward(signal.SIGTERM)
            return
        delay = min(MAX_BACKOFF_S, 2.0 ** (child.quick_exits - 1)) if child.quick_exits else (0.0 if code == 0 else 1.0)
        log.warning("worker %d (pid %d) exited with status %s after %.0f s; restarting in %.0f s",
                    child.index, child.process.pid if child.process else -1, code, uptime, delay)  # fmt: skip
        child.restarts += 1
        child.restart_at = time.monotonic() + delay

    def run(self) -> int:
        """Start every child, keep them running until stopped; returns the worst final status."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.forward)
            signal.signal(signal.SIGINT, self.forward)
        for child in self.children:
            self.start(child)
        while not all(child.done for child in self.children):
            now = time.monotonic()
            for child in self.children:
                if child.done:
                    continue
                if child.restart_at is not None:
                    if self.stopping.is_set():
                        child.done = True
                    elif now >= child.restart_at:
                        self.start(child)
                    continue
                code = child.process.poll() if child.process is not None else None
                if code is not None:
                    self._on_exit(child, code)
            self.stopping.wait(0.2)
        return self.exit_status()

    def exit_status(self) -> int:
        """0 when every child's last run ended cleanly (0, or killed by a signal we forwarded)."""
        worst = 0
        for child in self.children:
            if not child.codes:
                continue
            code = child.codes[-1]
            if code < 0 and -code in self.signals:
                code = 0
            worst = max(worst, abs(code))
        return worst


# --- one worker ------------------------------------------------------------------------------------
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

    def __call__(self, signum: int, frame: Any) -> None:
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


def run_worker(
    settings: Settings, *, name: str | None = None, bridge: bool = True, models: Any = None, metrics: Any = None
) -> int:
    """Load models, start pipeline + health server + bridge, run the rq worker until it stops."""
    from worker.health import Liveness
    from worker.intake import UploadsBridge
    from worker.metrics import Metrics
    from worker.rq_worker import TagWorker

    metrics = metrics or Metrics()
    state: dict[str, Any] = {"worker": None, "models": False}

    def ready() -> bool:
        worker = state["worker"]
        return bool(state["models"] and worker is not None and worker.redis_ok)

    liveness = Liveness(settings.liveness_timeout_s)  # /healthz: beaten by the rq worker's loop
    early = EarlyStop()
    in_main_thread = threading.current_thread() is threading.main_thread()  # the rq worker installs its own later
    if in_main_thread:
        early.loading()
    health = pipeline = None
    try:
        if settings.metrics_port:
            from worker.health import HealthServer

            try:
                health = HealthServer(settings.metrics_host, settings.metrics_port, metrics.registry, ready,
                                      liveness=liveness).start()  # fmt: skip
            except OSError as exc:  # the port is taken, or the host is not an address of this machine
                raise UsageError(f"cannot listen on {settings.metrics_host}:{settings.metrics_port} "
                                 f"({exc.strerror or exc})", setting="metrics_port") from exc  # fmt: skip
        if models is None:
            from worker.models import load_models

            models = load_models(settings)
        from worker.pipeline import Pipeline

        info = models.info() if hasattr(models, "info") else {"model_version": str(models.model_version)}
        metrics.model_info.labels(
            str(info.get("model_version", "")), str(info.get("image_extractor", "")),
            str(info.get("audio_extractor", "")), str(info.get("text_extractor", "")), str(info.get("device", "")),
        ).set(1)  # fmt: skip
        if metrics.track_gpu_memory(getattr(models, "device", "cpu")):
            log.info("exporting GPU memory of %s", models.device)
        if in_main_thread:
            early.loaded()  # from here on, a stop request is honoured by returning normally
        pipeline = Pipeline(settings, models, metrics)
        pipeline.start()
        state["models"] = True
        connection = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
        worker = TagWorker(
            settings, connection, pipeline, model_version=str(models.model_version), metrics=metrics, name=name,
            liveness=liveness,
        )
        state["worker"] = worker
        metrics.ready.set_function(lambda: 1.0 if ready() else 0.0)
        if early.requested.is_set():
            log.info("stop requested during start-up: exiting (nothing was in flight)")
            return 0
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
    import torch

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
    """What a worker (or a ``--gpus`` supervisor, whose children are ``devices``) checks before it binds
    the metrics port or loads a model: the metrics port range, the device (:func:`check_device`) and
    Redis (:func:`worker.client.connect`: the URL, then a PING with a short timeout; without ``ping``
    only the URL). Raises :class:`UsageError` or :class:`worker.cli_errors.ServiceUnavailable`."""
    from worker.client import connect, redis_address, redis_client

    children = len(devices) if devices else 1
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
    """``tagstream worker``: the pre-flight check, then one worker, or with ``--gpus`` the supervisor."""
    settings = settings_from_args(args)
    devices = None
    if args.gpus:
        try:
            devices = devices_for(args.gpus)
        except SystemExit as exc:  # devices_for's message names --gpus
            raise UsageError(str(exc.code)) from exc
    preflight(settings, devices, ping=not args.no_redis_check)
    if devices is not None:
        flags = [*child_flags(args), "--no-redis-check"]  # checked here; a restart may come during an outage
        return Supervisor(flags, devices, settings, name=args.name).run()
    log_startup_warnings(settings)  # what `tagstream doctor` would warn about, without loading models
    return run_worker(settings, name=args.name, bridge=not args.no_bridge)
