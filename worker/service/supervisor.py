"""The ``tagstream worker --gpus`` supervisor: worker processes per GPU, restarted when they die.

``--gpus`` makes ``tagstream worker`` a supervisor (:class:`Supervisor`) that runs ``workers_per_gpu``
(``--workers-per-gpu N``, default 1) full worker processes per GPU, each with its own rq job slots (K =
``concurrency``) and metrics port: one Python process feeding one GPU left an H100 16% busy on a 16-core
host (BENCHMARKS.md, the H100 end-to-end runs), so several processes per GPU feed it. The devices:

* ``--gpus all``: every visible GPU (the entries of ``CUDA_VISIBLE_DEVICES`` when set, else
  ``0..torch.cuda.device_count()-1``); without GPUs, one device "none" (the workers run on CPU).
* ``--gpus N``: the first N visible GPUs (an error when fewer are visible).
* ``--gpus 0,2`` (ids or GPU UUIDs): exactly these, passed through unchecked as
  ``CUDA_VISIBLE_DEVICES`` would take them. With ``--device cpu`` the children run on CPU, which is
  how the supervisor is tested on machines without GPUs.
* no ``--gpus`` but ``--workers-per-gpu N`` with N > 1: as ``--gpus all`` (so N CPU workers on a
  machine without GPUs).

Children (:func:`child_specs`): the ``j``-th worker of the device at position ``p`` is child
``i = p * N + j``; it gets ``CUDA_VISIBLE_DEVICES=<its device>`` (left as inherited for "none"), metrics
port ``metrics_port + i`` (0 stays 0) and, when ``--name`` is given, the rq worker name ``<name>-<i>``
(``<name>-<i>.<restarts>`` after a restart: rq refuses a name whose previous holder has not expired
yet), and ``--workers-per-gpu 1`` (a child is one worker, whatever ``TAGSTREAM_WORKERS_PER_GPU`` says).

CPU budget (:func:`share_cpu_budget`): the children share one machine, so each gets
``max(1, budget // children)`` of the supervisor's CPU budget
(:meth:`~worker.config.Settings.resolved_cpu_budget`, which every child would see as its own too) in
its environment (:data:`worker.config.CPU_SHARE_ENV`). A child's default thread counts are made of that
share instead of the whole budget: ``decode_threads`` 0 and, when its models run on CPU,
``inference_threads`` 0 (on a GPU the default of 1 inference thread stands, and the decode-thread
minimum for NVDEC still applies: the child resolves both itself, after it knows its device and decoder).
Without the split, 8 GPU workers on a 16-core box would each start 16 decoder processes. An explicit
thread count is per worker process, passed on as given. The supervisor logs the split once.

Every other flag and the environment are passed through. Children run in their own session, so a
terminal's Ctrl-C reaches only the supervisor, which forwards each SIGTERM/SIGINT it gets to every child
(the first starts the children's graceful shutdown, a second hands their jobs back at once); on Linux a
child also gets SIGTERM if the supervisor dies. A child that exits while the supervisor is not stopping
is restarted (a ``max_jobs`` recycle at once; a crash or the OOM killer after 1 s, doubling up to 30 s
while it keeps failing within :data:`QUICK_EXIT_S` of its start); after :data:`MAX_QUICK_EXITS` such
quick failures in a row the supervisor stops the others and exits with the child's status (a
configuration error should not loop forever). In ``--burst`` mode a child that exits 0 is done. The
supervisor exits with the worst status of its children's last runs (0 when all stopped cleanly).

The supervisor loads no model and imports no torch, except to count GPUs when ``CUDA_VISIBLE_DEVICES``
is unset (:func:`visible_devices`).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType

from worker.config import CPU_SHARE_ENV, Settings

log = logging.getLogger(__name__)

QUICK_EXIT_S = 60.0
MAX_QUICK_EXITS = 5
MAX_BACKOFF_S = 30.0


def visible_devices() -> list[str]:
    """Device ids visible to this process: ``CUDA_VISIBLE_DEVICES`` entries when it is set (as
    written, so UUIDs stay UUIDs), else ``0..n-1`` for torch's device count (imports torch)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch  # only here: the supervisor runs no model, and needs torch only to count GPUs

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no CUDA runtime means no GPUs
        return []


def devices_for(spec: str) -> list[str | None]:
    """The devices for a ``--gpus`` value (see module docstring); ``[None]``: no GPU, the workers run
    without a device assignment."""
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


#: Settings the supervisor sets for each child itself, never passed through from its own command line.
PER_CHILD = ("metrics_port", "workers_per_gpu")


def child_flags(args: argparse.Namespace) -> list[str]:
    """The worker flags given on the supervisor's command line, for its children, without ``--gpus``,
    ``--name`` and the settings set per child (:data:`PER_CHILD`). ``TAGSTREAM_*`` variables reach the
    children through the environment."""
    out: list[str] = []
    for key, value in vars(args).items():
        name = key.removeprefix("setting_")
        if not key.startswith("setting_") or value is None or name in PER_CHILD:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, str(value)]
    if args.no_bridge:
        out.append("--no-bridge")
    return out


@dataclass(frozen=True)
class ChildSpec:
    """What one supervised worker is: its index, its device (``CUDA_VISIBLE_DEVICES``; None: inherited),
    its metrics port (0: none) and its rq name (None: rq's random one)."""

    index: int
    device: str | None
    metrics_port: int
    name: str | None


def child_specs(
    devices: list[str | None], workers_per_gpu: int, metrics_port: int, name: str | None
) -> list[ChildSpec]:
    """``workers_per_gpu`` children for each of ``devices``: the ``j``-th of the device at position ``p`` is
    child ``i = p * workers_per_gpu + j``, with metrics port ``metrics_port + i`` (0 stays 0) and rq name
    ``<name>-<i>``."""
    specs = []
    for position, device in enumerate(devices):
        for j in range(workers_per_gpu):
            i = position * workers_per_gpu + j
            port = metrics_port + i if metrics_port else 0
            specs.append(ChildSpec(i, device, port, f"{name}-{i}" if name else None))
    return specs


@dataclass(frozen=True)
class CpuShare:
    """How ``children`` supervised workers share a CPU budget of ``budget`` CPUs: each gets ``cpus``."""

    budget: int
    children: int
    cpus: int


def share_cpu_budget(children: int, budget: int) -> CpuShare:
    """Each of ``children`` workers' share of ``budget`` CPUs: ``max(1, budget // children)``."""
    return CpuShare(budget=budget, children=children, cpus=max(1, budget // children))


def _die_with_parent() -> None:
    """In the child before exec: own session (terminal signals go to the supervisor only) and, on
    Linux, SIGTERM when the supervisor dies."""
    os.setsid()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except Exception:  # noqa: BLE001 - best effort
            pass


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    quick_exits: int = 0
    restart_at: float | None = None
    done: bool = False
    codes: list[int] = field(default_factory=list)

    @property
    def index(self) -> int:
        return self.spec.index


class Supervisor:
    """Runs and restarts one ``tagstream worker`` process per :class:`ChildSpec` (see module docstring);
    every child gets ``flags`` (:func:`child_flags`) and its ``share`` of the CPU budget."""

    def __init__(self, flags: list[str], specs: list[ChildSpec], settings: Settings, share: CpuShare) -> None:
        self.flags = list(flags)
        self.settings = settings
        self.share = share
        self.children = [Child(spec) for spec in specs]
        self.stopping = threading.Event()
        self.signals: list[int] = []

    def command(self, child: Child) -> tuple[list[str], dict[str, str]]:
        spec = child.spec
        cmd = [sys.executable, "-m", "worker.cli", "worker", *self.flags, "--workers-per-gpu", "1",
               "--metrics-port", str(spec.metrics_port)]  # fmt: skip
        if spec.name:
            cmd += ["--name", f"{spec.name}.{child.restarts}" if child.restarts else spec.name]
        env = {**os.environ, CPU_SHARE_ENV: str(self.share.cpus)}
        if spec.device is not None:
            env["CUDA_VISIBLE_DEVICES"] = spec.device
        return cmd, env

    def start(self, child: Child) -> None:
        cmd, env = self.command(child)
        child.process = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)  # noqa: PLW1509
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("worker %d started (pid %d, device %s)", child.index, child.process.pid, child.spec.device or "-")

    def forward(self, signum: int, frame: FrameType | None = None) -> None:
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
        if self.share.children > 1:
            log.info("CPU budget of %d split between %d workers: %d each (their decode threads and CPU inference "
                     "threads where those are 0)", self.share.budget, self.share.children, self.share.cpus)  # fmt: skip
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
