"""Utilisation read while a bench_feed.py measurement runs: the GPU's decoder engines and SMs by NVML (ctypes
on ``libnvidia-ml.so.1``, no Python package), the machine's CPU from ``/proc/stat`` and one process's CPU
from ``/proc/<pid>/stat``. Nothing here imports torch or PyAV.

Interpretations:

- NVML's decoder utilisation is the percentage of its last sampling period (about a second on data-centre
  GPUs) in which the decoder was busy; on a GPU with several NVDEC engines it is one figure for all of
  them, so 100% means every engine busy. SM utilisation is ``nvmlDeviceGetUtilizationRates().gpu``: the
  percentage of time one or more kernels ran, not how many SMs they filled.
- The :class:`Sampler` reads NVML every :data:`PERIOD_S` seconds between :meth:`Sampler.start` and
  :meth:`Sampler.stop` and reports the means; the CPU figure is the share of non-idle jiffies of all cores
  between the two calls (``busy_cores`` = that share x the number of cores).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PERIOD_S = 0.25
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class _Utilization(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


class Nvml:
    """GPU 0 through NVML. ``error`` is None when it works, else why not (then every reading is None)."""

    def __init__(self, index: int = 0) -> None:
        self.error: str | None = None
        self.name = ""
        self._lib: ctypes.CDLL | None = None
        self._handle = ctypes.c_void_p()
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError as exc:
            self.error = f"libnvidia-ml.so.1 not loadable ({exc})"
            return
        lib.nvmlErrorString.restype = ctypes.c_char_p
        self._lib = lib
        try:
            self._check(lib.nvmlInit_v2())
            self._check(lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(self._handle)))
            buf = ctypes.create_string_buffer(96)
            self._check(lib.nvmlDeviceGetName(self._handle, buf, ctypes.c_uint(96)))
            self.name = buf.value.decode(errors="replace")
        except RuntimeError as exc:
            self.error, self._lib = str(exc), None

    def _check(self, ret: int) -> None:
        if ret != 0:
            assert self._lib is not None
            raise RuntimeError(f"NVML error {ret}: {self._lib.nvmlErrorString(ret).decode(errors='replace')}")

    def decoder_percent(self) -> float | None:
        if self._lib is None:
            return None
        util, period = ctypes.c_uint(), ctypes.c_uint()
        try:
            self._check(self._lib.nvmlDeviceGetDecoderUtilization(self._handle, ctypes.byref(util), ctypes.byref(period)))
        except RuntimeError:
            return None
        return float(util.value)

    def sm_percent(self) -> float | None:
        if self._lib is None:
            return None
        rates = _Utilization()
        try:
            self._check(self._lib.nvmlDeviceGetUtilizationRates(self._handle, ctypes.byref(rates)))
        except RuntimeError:
            return None
        return float(rates.gpu)


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from the first line of /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@dataclass
class Utilisation:
    """Means over one window; None where the reading is unavailable."""

    decoder_percent: float | None
    sm_percent: float | None
    cpu_percent: float
    busy_cores: float

    def describe(self) -> dict[str, str]:
        """Table cells: decoder, SM, CPU."""
        def pct(v: float | None) -> str:
            return "unavailable" if v is None else f"{v:.0f}%"

        return {"decoder": pct(self.decoder_percent), "sm": pct(self.sm_percent),
                "cpu": f"{self.cpu_percent:.0f}% ({self.busy_cores:.1f} cores)"}


class Sampler:
    """NVML sampled on a thread and /proc/stat read at both ends, between :meth:`start` and :meth:`stop`."""

    def __init__(self, nvml: Nvml) -> None:
        self.nvml = nvml
        self._stop = threading.Event()
        self._dec: list[float] = []
        self._sm: list[float] = []
        self._cpu0 = (0, 0)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._cpu0 = cpu_jiffies()
        if self.nvml.error is None:
            self._thread = threading.Thread(target=self._loop, name="feed-sampler", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(PERIOD_S):
            for value, out in ((self.nvml.decoder_percent(), self._dec), (self.nvml.sm_percent(), self._sm)):
                if value is not None:
                    out.append(value)

    def stop(self) -> Utilisation:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        busy1, total1 = cpu_jiffies()
        busy0, total0 = self._cpu0
        share = (busy1 - busy0) / max(1, total1 - total0)
        return Utilisation(_mean(self._dec), _mean(self._sm), 100.0 * share, share * (os.cpu_count() or 1))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def wait_until(t: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``t``."""
    while (left := t - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))
