"""The CPU budget behind the default thread counts, on fake cgroup v1 and v2 trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker import cpu_budget as cb
from worker.config import Settings


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


@pytest.fixture()
def many_cpus(monkeypatch):
    """A 64-CPU node whose process may run on all 64 (no affinity restriction)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))


def v2_tree(tmp_path: Path, own: str, parent: str = "max 100000") -> tuple[Path, Path]:
    """A cgroup v2 tree with the process in /kubepods/pod1/ctr: ``own`` is the container's cpu.max."""
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpuset cpu io memory pids")
    write(root / "kubepods" / "pod1" / "cpu.max", parent)
    write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", own)
    proc = tmp_path / "proc-cgroup"
    write(proc, "0::/kubepods/pod1/ctr")
    return proc, root


def test_v2_quota_is_rounded_up(tmp_path, many_cpus):
    proc, root = v2_tree(tmp_path, "150000 100000")  # 1.5 CPUs
    budget = cb.cpu_budget(proc, root)
    assert budget.cpus == 2 and budget.quota_cpus == 1.5 and budget.source == "cgroup quota"
    assert budget.node_cpus == 64


def test_v2_tightest_ancestor_counts(tmp_path, many_cpus):
    proc, root = v2_tree(tmp_path, "max 100000", parent="300000 100000")
    assert cb.cpu_budget(proc, root).cpus == 3


def test_v2_without_quota_is_the_node(tmp_path, many_cpus):
    proc, root = v2_tree(tmp_path, "max 100000")
    budget = cb.cpu_budget(proc, root)
    assert (budget.cpus, budget.quota_cpus, budget.source) == (64, None, "node")


def test_v1_quota(tmp_path, many_cpus):
    root = tmp_path / "cgroup"
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "200000")
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000")
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1")
    write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000")
    proc = tmp_path / "proc-cgroup"
    write(proc, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/")
    assert cb.cpu_budget(proc, root).cpus == 2


def test_v1_unlimited_quota(tmp_path, many_cpus):
    root = tmp_path / "cgroup"
    write(root / "cpu" / "cpu.cfs_quota_us", "-1")
    write(root / "cpu" / "cpu.cfs_period_us", "100000")
    proc = tmp_path / "proc-cgroup"
    write(proc, "1:cpu:/")
    assert cb.cpu_budget(proc, root).quota_cpus is None


def test_affinity_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 4, 5})
    proc, root = v2_tree(tmp_path, "max 100000")
    budget = cb.cpu_budget(proc, root)
    assert (budget.cpus, budget.source) == (3, "affinity")


def test_small_quota_is_at_least_one(tmp_path, many_cpus):
    proc, root = v2_tree(tmp_path, "10000 100000")  # 0.1 CPU
    assert cb.cpu_budget(proc, root).cpus == 1


def test_settings_defaults_follow_the_budget(tmp_path, many_cpus, monkeypatch):
    """A pod limited to 2 CPUs on a 64-CPU node: 2 decode and 2 CPU inference threads, not 64."""
    proc, root = v2_tree(tmp_path, "200000 100000")
    monkeypatch.setattr(cb, "PROC_CGROUP", proc)
    monkeypatch.setattr(cb, "CGROUP_ROOT", root)
    settings = Settings()
    assert settings.resolved_decode_threads() == 2
    assert settings.resolved_inference_threads("cpu") == 2
    assert settings.resolved_inference_threads("cuda") == 1
    assert Settings(decode_threads=5).resolved_decode_threads() == 5
