"""The ``tagstream worker --gpus`` supervisor: one worker process per GPU, restarted when it dies.

``--gpus`` makes ``tagstream worker`` a supervisor (:class:`Supervisor`) that runs one worker process per GPU:

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

from worker.config import Settings

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
    if args.no_bridge:
        out.append("--no-bridge")
    return out


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
