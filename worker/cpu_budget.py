"""How many CPUs this process may really use, for the default thread counts.

``os.cpu_count()`` is the node's CPU count: a pod that requests 2 CPUs on a 64-core node would start
64 decoder processes and 64 inference threads under its memory limit. The effective budget is the
smaller of two limits, rounded up and at least 1:

* the CPU affinity mask (``os.sched_getaffinity``: ``taskset``, cpusets, Kubernetes' static CPU
  manager), and
* the CFS quota of the process's cgroup: cgroup v2 ``cpu.max`` (``"<quota> <period>"`` or
  ``"max <period>"``), cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: none). A quota of
  1.5 CPUs gives 2: a thread pool of 2 uses the quota fully, one of 1 leaves half of it idle.

The cgroup of the process is read from ``/proc/self/cgroup`` and looked up under ``/sys/fs/cgroup``
(both locations can be replaced, which the tests do with a fake tree). In a container the process's
cgroup path is usually ``/`` (cgroup namespace), so the root files are the container's own. Where a
parent cgroup carries a tighter quota than the process's own, the tightest on the path to the root
counts, as the kernel enforces every level.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs this process may use. ``cpus`` is the budget; the other fields say where it came from."""

    cpus: int
    node_cpus: int
    affinity_cpus: int
    quota_cpus: float | None  # None: no CFS quota anywhere on the cgroup path
    source: str  # "node", "affinity" or "cgroup quota"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_paths(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """The process's cgroup v2 path (the ``0::`` line) and cgroup v1 ``cpu`` controller path."""
    v2 = v1 = None
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(base: Path, cgroup_path: str) -> list[Path]:
    """``base/<path>``, then each parent up to ``base`` itself."""
    rel = Path(cgroup_path.lstrip("/"))
    out = [base / rel]
    while rel != Path("."):
        rel = rel.parent
        out.append(base / rel)
    return out


def _v2_quota(directory: Path) -> float | None:
    text = _read(directory / "cpu.max")
    if not text:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max" or not period:
        return None
    return int(quota) / int(period)


def _v1_quota(directory: Path) -> float | None:
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    if quota is None or period is None or int(quota) <= 0 or int(period) <= 0:
        return None
    return int(quota) / int(period)


def cgroup_quota_cpus(proc_cgroup: Path | None = None, cgroup_root: Path | None = None) -> float | None:
    """The tightest CFS quota, in CPUs, on the process's cgroup path (v2, else v1); None without one.
    ``proc_cgroup`` and ``cgroup_root`` default to :data:`PROC_CGROUP` and :data:`CGROUP_ROOT`."""
    proc_cgroup = proc_cgroup or PROC_CGROUP
    cgroup_root = cgroup_root or CGROUP_ROOT
    v2, v1 = _cgroup_paths(proc_cgroup)
    if v2 is not None and (cgroup_root / "cgroup.controllers").exists():
        quotas = [_v2_quota(d) for d in _ancestors(cgroup_root, v2)]
    elif v1 is not None:
        base = next((cgroup_root / n for n in ("cpu,cpuacct", "cpu", "cpuacct,cpu") if (cgroup_root / n).is_dir()), None)
        quotas = [_v1_quota(d) for d in _ancestors(base, v1)] if base is not None else []
    else:
        quotas = []
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (the node's count where the platform has no mask)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_budget(proc_cgroup: Path | None = None, cgroup_root: Path | None = None) -> CpuBudget:
    """The effective CPU budget (see the module docstring)."""
    node = os.cpu_count() or 1
    affinity = affinity_cpus()
    quota = cgroup_quota_cpus(proc_cgroup, cgroup_root)
    cpus, source = (affinity, "affinity") if affinity < node else (node, "node")
    if quota is not None and math.ceil(quota) < cpus:
        cpus, source = math.ceil(quota), "cgroup quota"
    return CpuBudget(cpus=max(1, cpus), node_cpus=node, affinity_cpus=affinity, quota_cpus=quota, source=source)
