"""The lock files in ``requirements/`` (written by ``scripts/lock.sh``), and how an environment compares.

A lock line is ``name==version \\`` followed by ``--hash=...`` lines and ``# via`` comments; only the
``name==version`` pins matter here. Names are compared in PEP 503 normal form (``Foo_Bar`` = ``foo-bar``).
Installed versions come from ``importlib.metadata``; a local label (``2.11.0+cu130``) is compared as written,
since the lock pins the exact wheel.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from dataclasses import dataclass
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")
REQUIREMENTS_DIR = Path(__file__).resolve().parents[1] / "requirements"


def normalise(name: str) -> str:
    """PEP 503 normal form of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """``{normalised name: version}`` of every pin in the lock file at ``path``."""
    pins: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            pins[normalise(match.group(1))] = match.group(2)
    return pins


def default_lock(kind: str = "runtime") -> Path:
    """``requirements/requirements-<kind>-pyX.Y.txt`` beside the package sources, for this interpreter (it
    may not exist: an installed wheel carries no lock)."""
    return REQUIREMENTS_DIR / f"requirements-{kind}-py{sys.version_info[0]}.{sys.version_info[1]}.txt"


@dataclass(frozen=True)
class Mismatch:
    """One locked distribution that is missing (``installed`` None) or at another version."""

    name: str
    locked: str
    installed: str | None


def installed_lock_mismatches(pins: dict[str, str]) -> list[Mismatch]:
    """Every pin that this environment does not satisfy exactly, sorted by name."""
    out = []
    for name, locked in sorted(pins.items()):
        try:
            installed: str | None = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != locked:
            out.append(Mismatch(name, locked, installed))
    return out
