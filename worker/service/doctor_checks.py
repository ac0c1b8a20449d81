"""The checks of ``tagstream doctor`` on the installed software and the CPU budget, and the
:class:`Check` record every doctor check returns. Each check is a small function returning a
:class:`Check` (or a list of them); none raises for a problem it was written to find. The GPU checks are
in :mod:`worker.service.doctor_device`, the Redis ones in :mod:`worker.service.doctor_redis`.

Interpretations:

* A package the worker needs that is missing or does not import is FAIL; versions are informational.
* torchaudio must import (its native library is loaded at import; one built for another torch fails
  with ``undefined symbol``) and be torch's own release (same version without the local label): FAIL.
* The lock: every ``name==version`` pin must be installed at exactly that version (FAIL naming each
  difference). Which lock: ``--lock FILE``, else ``TAGSTREAM_LOCK_FILE`` (the container image sets it),
  else ``requirements/requirements-runtime-pyX.Y.txt`` beside the package sources (a checkout). The environment
  variable is taken before the checkout's file because it is the more deliberate statement of which
  lock this environment was built from. An explicitly named file that does not exist is FAIL (the
  operator asked for a comparison that cannot be made); no lock found at all is WARN (an installed wheel
  carries none). A lock whose header names another Python than this one is WARN when all pins match.
* CPU: the budget (:func:`worker.cpu_budget.cpu_budget`) is information; an explicitly configured
  ``decode_threads`` or (on CPU) ``inference_threads`` above it is WARN (threads contend for too few CPUs).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import platform
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

from worker.lockfile import default_lock, installed_lock_mismatches, read_lock

log = logging.getLogger(__name__)

Status = Literal["OK", "WARN", "FAIL"]
LOCK_ENV = "TAGSTREAM_LOCK_FILE"
MAX_LISTED = 10


@dataclass(frozen=True)
class Check:
    """One line of the report. ``status`` FAIL blocks work; WARN does not."""

    name: str
    status: Status
    detail: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def ok(name: str, detail: str) -> Check:
    return Check(name, "OK", detail)


def warn(name: str, detail: str) -> Check:
    return Check(name, "WARN", detail)


def fail(name: str, detail: str) -> Check:
    return Check(name, "FAIL", detail)


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


# --- versions -----------------------------------------------------------------------------------------


def check_python() -> Check:
    return ok("python", f"{platform.python_version()} ({sys.executable})")


def check_torch() -> Check:
    try:
        import torch  # inside the check: whether it imports is the finding
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        return fail("torch", f"does not import: {error_text(exc)}")
    return ok(
        "torch",
        f"{torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU build'})",
    )


def _release(version: str) -> str:
    return version.split("+", 1)[0]


def check_torchaudio(import_module: Callable[[str], ModuleType] = importlib.import_module) -> Check:
    """torchaudio imports (loading its native library) and is the release of the installed torch."""
    try:
        torchaudio = import_module("torchaudio")
    except Exception as exc:  # noqa: BLE001 - OSError 'undefined symbol' is the classic one
        hint = (
            " (a torchaudio built for another torch: install torch's own release)"
            if "undefined symbol" in str(exc)
            else ""
        )
        return fail("torchaudio", f"does not import: {error_text(exc)}{hint}")
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "?"
    version = str(getattr(torchaudio, "__version__", "?"))
    if _release(version) != _release(torch_version):
        return fail(
            "torchaudio",
            f"{version} is not the release of torch {torch_version}: install torchaudio=="
            f"{_release(torch_version)}",
        )
    return ok("torchaudio", f"{version} (imports; matches torch {torch_version})")


def check_torchvision() -> Check:
    try:
        import torchvision  # inside the check: whether it imports is the finding
    except Exception as exc:  # noqa: BLE001
        return fail("torchvision", f"does not import: {error_text(exc)}")
    return ok("torchvision", torchvision.__version__)


def check_pyav() -> Check:
    """PyAV and the FFmpeg it was built with (``ffmpeg_version_info`` and the libav* versions)."""
    try:
        import av  # inside the check: whether it imports is the finding
    except Exception as exc:  # noqa: BLE001
        return fail("pyav", f"does not import: {error_text(exc)}")
    libs = getattr(av, "library_versions", {}) or {}
    codec = ".".join(str(n) for n in libs.get("libavcodec", ())) or "?"
    ffmpeg = getattr(av, "ffmpeg_version_info", None) or "?"
    return ok("pyav", f"{av.__version__}, FFmpeg {ffmpeg} (libavcodec {codec})")


def check_distribution(name: str, distribution: str) -> Check:
    """A distribution's installed version from its metadata (no import); missing is FAIL."""
    try:
        return ok(name, importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return fail(name, f"distribution {distribution!r} is not installed")


def version_checks() -> list[Check]:
    return [
        check_python(),
        check_torch(),
        check_torchaudio(),
        check_torchvision(),
        check_pyav(),
        check_distribution("rq", "rq"),
        check_distribution("redis-py", "redis"),
        check_distribution("transformers", "transformers"),
    ]


# --- the lock -----------------------------------------------------------------------------------------


def find_lock(
    explicit: str | Path | None = None, environ: dict[str, str] | None = None
) -> tuple[Path | None, str]:
    """The lock file to compare with and where its name came from (see the module docstring for the order)."""
    environ = os.environ if environ is None else environ
    if explicit:
        return Path(explicit), "--lock"
    if environ.get(LOCK_ENV):
        return Path(environ[LOCK_ENV]), LOCK_ENV
    default = default_lock("runtime")
    return (default, "checkout") if default.is_file() else (None, "none")


def check_lock(path: Path | None, source: str) -> Check:
    """Every pin of the lock at ``path`` installed at its version; names every difference."""
    if path is None:
        return warn(
            "lock",
            f"no lock file found (no --lock, no {LOCK_ENV}, no {default_lock('runtime')}): "
            "installed versions not compared",
        )
    if not path.is_file():
        return fail("lock", f"lock file {str(path)!r} (from {source}) does not exist")
    pins = read_lock(path)
    if not pins:
        return fail("lock", f"{path} holds no name==version pins")
    mismatches = installed_lock_mismatches(pins)
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    header = re.search(r"Python (\d+\.\d+)", path.read_text().partition("\n")[0])
    other_python = (
        f"; the lock was made for Python {header.group(1)}, this is {python}"
        if (header and header.group(1) != python)
        else ""
    )
    if mismatches:
        listed = [f"{m.name} {m.installed or 'missing'} (locked {m.locked})" for m in mismatches[:MAX_LISTED]]
        more = f" and {len(mismatches) - MAX_LISTED} more" if len(mismatches) > MAX_LISTED else ""
        return fail(
            "lock",
            f"{len(mismatches)} of {len(pins)} locked distributions differ from {path}: "
            f"{', '.join(listed)}{more}{other_python}",
        )
    if other_python:
        return warn("lock", f"all {len(pins)} pins of {path} installed{other_python}")
    return ok(
        "lock", f"all {len(pins)} locked distributions installed at their versions ({path}, from {source})"
    )
