"""Helpers shared by the deploy tests: system tools, the PromQL used in deploy/, metric names.

- :func:`ensure_tool` finds a binary or installs its Debian package with apt-get; a failed install
  is a test failure (never a skip), because the checks are the point of the tests.
- :func:`deploy_expressions` lists every PromQL expression the dashboard, the rules and the KEDA
  ScaledObjects use, with where it comes from.
- :func:`metric_names` extracts the metric names a PromQL expression selects. It is a small lexer,
  not a full parser: string literals, label matchers, ranges, durations, numbers, function names,
  keywords and the label lists of ``by``/``without``/``on``/``ignoring``/``group_*`` are removed;
  every identifier left is a metric name.
- :func:`exported_metric_names` is what ``worker/metrics.py`` exports, with the sample suffixes
  Prometheus sees (``_total`` for counters, ``_bucket``/``_sum``/``_count`` for histograms).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tagstream.json"
RULES = DEPLOY / "prometheus" / "rules" / "tagstream.rules.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "tagstream.rules.test.yaml"
K8S_BASE = DEPLOY / "k8s" / "base"
K8S_GPU = DEPLOY / "k8s" / "overlays" / "gpu"

# Names that are not exported by the worker but legitimately queried: Prometheus's own target health,
# and rq-exporter's metrics (REFERENCE.md "rq") for users who run it next to the workers.
EXTERNAL_METRICS = {"up", "rq_jobs", "rq_workers", "rq_job_count", "rq_workers_success_total", "rq_workers_failed_total"}

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "inf", "nan", "atan2",
}  # fmt: skip


def ensure_tool(binary: str, package: str) -> str:
    """Path of ``binary``; installs Debian ``package`` with apt-get when missing. Fails the test when
    the install fails."""
    found = shutil.which(binary)
    if found:
        return found
    apt_install(package)
    found = shutil.which(binary)
    if not found:
        pytest.fail(f"installed {package} but {binary} is still not on PATH")
    return found


def apt_install(package: str) -> None:
    """Install Debian ``package`` with apt-get; fails the test when that is impossible."""
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.fail(f"apt-get is not available to install {package}")
    for cmd in ([apt, "update", "-q"], [apt, "install", "-y", "-q", package]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def load_rules() -> list[dict]:
    """Every rule (recording and alerting) of the rules file."""
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def render_kustomize(path: Path) -> list[dict]:
    """``kubectl kustomize PATH`` rendered into a list of objects."""
    kubectl = ensure_tool("kubectl", "kubernetes-client")
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def deploy_expressions() -> list[tuple[str, str]]:
    """``(where, expr)`` for every PromQL expression in the dashboard, the rules and the KEDA
    ScaledObjects (base and GPU overlay source files). Grafana's ``$__rate_interval`` is kept."""
    out: list[tuple[str, str]] = []
    for panel in load_dashboard()["panels"]:
        for target in panel.get("targets", []):
            out.append((f"dashboard:{panel['title']}:{target['refId']}", target["expr"]))
    for rule in load_rules():
        name = rule.get("record") or rule.get("alert")
        out.append((f"rule:{name}", rule["expr"].strip()))
    for path in sorted((DEPLOY / "k8s").rglob("scaledobject*.yaml")):
        doc = yaml.safe_load(path.read_text())
        for trigger in doc["spec"].get("triggers", []):
            if trigger["type"] == "prometheus":
                out.append((f"keda:{path.relative_to(DEPLOY)}", trigger["metadata"]["query"]))
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (see the module docstring for the method)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\S+", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)", text):
        name = match.group(1)
        rest = text[match.end():].lstrip()
        if rest.startswith("("):  # a function or aggregation
            continue
        if name.lower() in _KEYWORDS or re.fullmatch(r"\d+(\.\d+)?(e\d+)?", name):
            continue
        names.add(name)
    return names


def exported_metric_names() -> set[str]:
    """Sample names of every metric in worker/metrics.py."""
    from worker.metrics import Metrics

    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def recorded_names() -> set[str]:
    return {rule["record"] for rule in load_rules() if "record" in rule}
