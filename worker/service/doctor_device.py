"""The device checks of ``tagstream doctor``: what the worker will run on, the NVIDIA driver, each GPU,
PyAV's NVDEC decoders, and the CPU budget with the thread counts the worker derives from it. Nothing here needs nvidia-smi: GPU names and capabilities come from torch, the
driver version from pynvml when installed, else ``/proc/driver/nvidia/version``, and the CUDA version
the driver supports from ``libcuda.so.1`` (``cuDriverGetVersion``) when it loads.

Interpretations:

* Without a GPU the worker runs on CPU: OK, unless a CUDA device is configured (FAIL). A driver that is
  present while torch sees no CUDA device is WARN (with ``device=auto`` the worker would quietly run on
  CPU).
* Driver: a torch CUDA build of major version M needs a driver of the branch in
  :data:`MIN_DRIVER_BRANCH` (CUDA 13: R580) or, where only the CUDA driver API version is known, one that
  supports CUDA M.0. Too old on a GPU host is FAIL (the GPUs cannot be used), WARN with ``device=cpu``.
* GPUs below :data:`MIN_COMPUTE_CAPABILITY` for the build (the CUDA 13 build dropped Volta and older:
  < 7.5) are FAIL, WARN with ``device=cpu``.
* NVDEC (``h264_cuvid``, ``hevc_cuvid`` and FFmpeg's ``cuda`` hwdevice) missing while a GPU is in use
  with ``hwaccel`` auto/cuda is WARN: decoding falls back to software, which works but costs CPU.
  ``hwaccel=cuda`` without a GPU is WARN (every video tries NVDEC first). ``hwaccel=auto`` on a GPU host
  runs the worker's start-up probe (:mod:`worker.media.hwaccel`; not with ``--quick``) and says which
  value auto will choose and why: OK when NVDEC decoded in the probe, whichever is chosen; WARN when the
  probe or NVDEC failed, or NVDEC silently fell back to software.
"""

from __future__ import annotations

import ctypes
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from worker.config import Settings
from worker.cpu_budget import cpu_budget
from worker.service.doctor_checks import Check, error_text, fail, ok, warn

log = logging.getLogger(__name__)

MIN_DRIVER_BRANCH: dict[int, int] = {13: 580, 12: 525, 11: 450}
"""Oldest NVIDIA driver branch for each CUDA major version of a torch build (minor-version compatibility)."""
MIN_COMPUTE_CAPABILITY: dict[int, tuple[int, int]] = {13: (7, 5)}
"""Oldest GPU a torch CUDA build of this major version runs on (CUDA 13: Turing, sm_75)."""
NVDEC_CODECS = ("h264_cuvid", "hevc_cuvid")
DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")


@dataclass(frozen=True)
class DriverInfo:
    """The NVIDIA driver as far as it can be read without nvidia-smi. ``cuda_version`` is the CUDA driver
    API version (``cuDriverGetVersion``: 13000 for CUDA 13.0); every field may be None."""

    version: str | None = None
    branch: int | None = None
    cuda_version: int | None = None
    source: str = "none"


def parse_driver_version(text: str) -> str | None:
    """The version in ``/proc/driver/nvidia/version`` (``NVRM version: NVIDIA UNIX ... Module  580.65.06 ...``)."""
    match = re.search(r"Module\b.*?\s(\d{2,4}\.\d+(?:\.\d+)?)\s", text)
    return match.group(1) if match else None


def _driver_from_pynvml() -> str | None:
    try:
        import pynvml  # type: ignore[import-not-found]  # an optional dependency
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - NVML missing or no driver
        log.debug("pynvml: %s", exc)
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def _cuda_driver_api_version() -> int | None:
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        value = ctypes.c_int(0)
        if libcuda.cuDriverGetVersion(ctypes.byref(value)) != 0:
            return None
        return value.value or None
    except (OSError, AttributeError) as exc:
        log.debug("libcuda: %s", exc)
        return None


def read_driver_info(version_file: Path = DRIVER_VERSION_FILE) -> DriverInfo:
    """Driver version from pynvml when installed, else ``/proc/driver/nvidia/version``; the CUDA driver
    API version from ``libcuda.so.1`` when it loads."""
    version, source = _driver_from_pynvml(), "pynvml"
    if version is None and version_file.is_file():
        try:
            version, source = parse_driver_version(version_file.read_text()), str(version_file)
        except OSError:
            version = None
    cuda_version = _cuda_driver_api_version()
    if version is None:
        source = "libcuda" if cuda_version else "none"
    branch = int(version.split(".")[0]) if version else None
    return DriverInfo(version=version, branch=branch, cuda_version=cuda_version, source=source)


def _cuda_major(torch_cuda: str | None) -> int | None:
    try:
        return int(str(torch_cuda).split(".")[0]) if torch_cuda else None
    except ValueError:
        return None


def _cuda_text(api_version: int) -> str:
    return f"{api_version // 1000}.{api_version % 1000 // 10}"


def evaluate_driver(torch_cuda: str | None, driver: DriverInfo, device: str) -> Check:
    """Whether the driver can run this torch build (see the module docstring)."""
    if torch_cuda is None:
        return ok("driver", "torch is a CPU build: no driver needed")
    major = _cuda_major(torch_cuda)
    if driver.version is None and driver.cuda_version is None:
        return ok(
            "driver",
            f"no NVIDIA driver found (CPU mode); torch CUDA {torch_cuda} would need "
            f"R{MIN_DRIVER_BRANCH.get(major or 0, '?')} or newer",
        )
    shown = driver.version or "version unknown"
    if driver.cuda_version:
        shown += f", supports CUDA {_cuda_text(driver.cuda_version)}"
    need = MIN_DRIVER_BRANCH.get(major or 0)
    if driver.branch is not None and need is not None:
        too_old = driver.branch < need
    elif driver.cuda_version is not None and major is not None:
        too_old = driver.cuda_version < major * 1000
    else:
        return ok("driver", f"{shown} (requirement of CUDA {torch_cuda} unknown)")
    if too_old:
        make = warn if device == "cpu" else fail
        return make(
            "driver",
            f"{shown} is too old for torch's CUDA {torch_cuda} build, which needs "
            f"R{need or '?'} or newer: the GPUs cannot be used",
        )
    return ok("driver", f"{shown} (torch CUDA {torch_cuda} needs R{need or '?'}+)")


def evaluate_gpu(
    index: int, name: str, capability: tuple[int, int], memory_bytes: int, torch_cuda: str | None, device: str
) -> Check:
    """One GPU: name, compute capability, memory; FAIL below the build's minimum capability."""
    detail = f"{name}, compute capability {capability[0]}.{capability[1]}, {memory_bytes / 2**30:.0f} GiB"
    minimum = MIN_COMPUTE_CAPABILITY.get(_cuda_major(torch_cuda) or 0)
    if minimum is not None and tuple(capability) < minimum:
        make = warn if device == "cpu" else fail
        return make(
            f"gpu:{index}",
            f"{detail}: not supported by torch's CUDA {torch_cuda} build (needs "
            f"{minimum[0]}.{minimum[1]}+, Turing or newer)",
        )
    return ok(f"gpu:{index}", detail)


def device_checks(settings: Settings) -> list[Check]:
    """``device`` (what the worker will run on), ``driver`` and one ``gpu:N`` per visible GPU."""
    try:
        import torch  # inside the check: whether it imports is the finding
    except Exception:  # noqa: BLE001 - reported by check_torch
        return [fail("device", "torch does not import")]
    want = settings.device
    driver = read_driver_info()
    checks: list[Check] = []
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    if want == "cpu":
        checks.append(ok("device", "cpu (configured)" + (f"; {count} GPU(s) left unused" if count else "")))
    elif want == "mps":
        mps = getattr(torch.backends, "mps", None)
        checks.append(
            ok("device", "mps (configured)")
            if mps is not None and mps.is_available()
            else fail("device", "mps configured but not available on this host")
        )
    elif available:
        index = int(want.partition(":")[2] or 0)
        if index >= count:
            checks.append(fail("device", f"{want} configured but only {count} GPU(s) are visible"))
        else:
            checks.append(ok("device", f"cuda: {count} GPU(s) visible, the worker uses cuda:{index}"))
    elif want.startswith("cuda"):
        checks.append(
            fail("device", f"{want} configured but CUDA is not available (torch {torch.__version__})")
        )
    elif driver.version or driver.cuda_version:
        checks.append(
            warn(
                "device",
                "an NVIDIA driver is present but torch cannot use CUDA: with device=auto "
                "the worker runs on CPU",
            )
        )
    else:
        checks.append(ok("device", "CPU mode: no CUDA device; the worker runs on CPU"))
    checks.append(evaluate_driver(torch.version.cuda, driver, want))
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        checks.append(
            evaluate_gpu(
                i,
                torch.cuda.get_device_name(i),
                (props.major, props.minor),
                props.total_memory,
                torch.version.cuda,
                want,
            )
        )
    return checks


def uses_gpu(settings: Settings) -> bool:
    """Whether the worker would run its models on a GPU with these settings."""
    if settings.device == "cpu":
        return False
    try:
        import torch  # inside the check: whether it imports is the finding

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


PIN_HWACCEL = "pin it with TAGSTREAM_HWACCEL=cuda or none"


def check_nvdec(settings: Settings, probe_device: bool = False) -> Check:
    """PyAV's NVDEC decoders and ``cuda`` hwdevice, and what the worker will decode with (see the module
    docstring). With ``probe_device``: for ``hwaccel=auto`` on a GPU host the worker's own start-up probe
    (:func:`worker.engine.decoding.resolve_hwaccel`, up to ~20 s), whose figures and choice the line gives;
    for ``hwaccel=cuda`` one CUDA device context, which needs a working driver."""
    try:  # inside the check: whether PyAV imports is the finding
        import av

        from worker.media.hwaccel import cuda_listed
    except Exception as exc:  # noqa: BLE001
        return fail("nvdec", f"PyAV does not import: {error_text(exc)}")
    codecs = [c for c in NVDEC_CODECS if c in av.codec.codecs_available]
    hwdevice = cuda_listed()
    have = ", ".join(codecs + (["cuda hwdevice"] if hwdevice else [])) or "none"
    if settings.hwaccel == "none":
        return ok("nvdec", f"off (hwaccel=none): software decoding; FFmpeg has: {have}")
    pinned = settings.hwaccel == "cuda"
    if not uses_gpu(settings):
        if pinned:
            return warn(
                "nvdec",
                "hwaccel=cuda without a GPU: every video tries NVDEC, then decodes in software "
                "(TAGSTREAM_HWACCEL=auto or none: software at once)",
            )
        return ok("nvdec", f"no GPU: hwaccel=auto decodes in software (no probe run); FFmpeg has: {have}")
    missing = [c for c in NVDEC_CODECS if c not in codecs] + ([] if hwdevice else ["cuda hwdevice"])
    if missing:
        return warn("nvdec", f"missing {', '.join(missing)}: videos decode in software on the CPU")
    if not probe_device:
        return ok(
            "nvdec", f"{have}; " + ("hwaccel=cuda (set)" if pinned else "auto's probe not run (--quick)")
        )
    if pinned:
        try:
            from av.codec.hwaccel import HWAccel  # inside the check: whether it imports is the finding

            HWAccel("cuda").create(av.Codec("h264", "r"))
        except Exception as exc:  # noqa: BLE001
            return warn(
                "nvdec",
                f"{have} listed, but a CUDA decoder context fails ({error_text(exc)}): "
                "videos decode in software",
            )
        sessions = settings.resolved_decode_threads(hwaccel="cuda")
        return ok(
            "nvdec", f"{have}; a CUDA decoder context opens; hwaccel=cuda (set): {sessions} NVDEC sessions"
        )
    # inside the check: the engine imports PyAV, whose import is this check's first finding
    from worker.engine.decoding import resolve_hwaccel

    choice = resolve_hwaccel(settings, "cuda")
    threads = settings.resolved_decode_threads(hwaccel=choice.hwaccel)
    probe = choice.probe
    worked = probe is not None and probe.nvdec_decoded()
    detail = (
        f"auto chooses {choice.hwaccel} ({threads} decode threads): {choice.reason}; "
        f"probe: {probe.describe() if probe else 'none'}; {PIN_HWACCEL}"
    )
    return ok("nvdec", detail) if worked else warn("nvdec", detail)


def device_type(settings: Settings) -> str:
    """``cpu``, ``cuda`` or ``mps``: the kind of device the worker's models would run on."""
    if settings.device == "auto":
        return "cuda" if uses_gpu(settings) else "cpu"
    return settings.device.partition(":")[0]


# --- CPU budget ---------------------------------------------------------------------------------------


def cpu_checks(settings: Settings) -> list[Check]:
    """``cpu-budget`` (:func:`worker.cpu_budget.cpu_budget`) and ``threads``, the counts the worker uses
    (:meth:`Settings.resolved_decode_threads`, :meth:`Settings.resolved_inference_threads`)."""
    budget = cpu_budget()
    quota = "none" if budget.quota_cpus is None else f"{budget.quota_cpus:g}"
    checks = [
        ok(
            "cpu-budget",
            f"{budget.cpus} CPU(s), limited by {budget.source} (node {budget.node_cpus}, "
            f"affinity {budget.affinity_cpus}, cgroup quota {quota})",
        )
    ]
    kind = device_type(settings)
    decode = settings.resolved_decode_threads(hwaccel=settings.hwaccel)
    inference = settings.resolved_inference_threads(kind)
    detail = (
        f"decode {decode}, inference {inference} on {kind}, concurrency {settings.concurrency}"
        f"{'' if settings.decode_isolation else ', decode in-process'}"
    )
    over = [
        f"{name}={value}"
        for name, value, configured in (
            ("decode_threads", decode, settings.decode_threads),
            ("inference_threads", inference, settings.inference_threads if kind == "cpu" else 0),
        )
        if configured and value > budget.cpus
    ]
    if over:
        checks.append(warn("threads", f"{detail}: {', '.join(over)} exceed the {budget.cpus}-CPU budget"))
    else:
        checks.append(ok("threads", detail))
    return checks
