"""Helpers shared by the deploy tests: system tools, the PromQL used in deploy/, metric names.

- :func:`ensure_tool` finds a binary or installs its Debian package with apt-get; a failed install
  is a test failure (never a skip), because the checks are the point of the tests.
- :func:`deploy_expressions` lists every PromQL expression the dashboard, the rules and the KEDA
  ScaledObjects use, with where it comes from, made concrete for a Prometheus that scrapes a worker
  directly (tests/test_prometheus_live.py): the dashboard's template variables take their default
  values, and the ``namespace`` matcher of the KEDA query, a label only Kubernetes service discovery
  attaches, is dropped (tests/test_deploy.py checks it against the rendered manifests instead).
- :func:`metric_names` extracts the metric names a PromQL expression selects. It is a small lexer,
  not a full parser: string literals, label matchers, ranges, durations, numbers, function names,
  keywords and the label lists of ``by``/``without``/``on``/``ignoring``/``group_*`` are removed;
  every identifier left is a metric name.
- :func:`exported_metric_names` is what ``worker/metrics.py`` exports, with the sample suffixes
  Prometheus sees (``_total`` for counters, ``_bucket``/``_sum``/``_count`` for histograms), including
  prometheus_client's process collector, which the worker registers (:data:`PROCESS_METRICS`).
- :func:`strict_crd_schema` turns a CRD's openAPIV3Schema (deploy/schemas/) into the JSON schema that
  rejects unknown fields, as the API server does under kubectl's default ``--validate=strict``.
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
SCHEMAS = DEPLOY / "schemas"

# Names that are not exported by the worker but legitimately queried: Prometheus's own target health,
# and rq-exporter's metrics for users who run it next to the workers.
EXTERNAL_METRICS = {"up", "rq_jobs", "rq_workers", "rq_job_count", "rq_workers_success_total", "rq_workers_failed_total"}
# prometheus_client's ProcessCollector, registered on the worker's registry (worker/metrics.py). It reads
# /proc, so it yields nothing where there is none; the worker's images and hosts are Linux, so these are
# exported there whatever the registry shows on the machine running the tests.
PROCESS_METRICS = {
    "process_resident_memory_bytes", "process_virtual_memory_bytes", "process_cpu_seconds_total",
    "process_open_fds", "process_max_fds", "process_start_time_seconds",
}  # fmt: skip

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


def dashboard_variable_defaults(dashboard: dict | None = None) -> dict[str, str]:
    """``{name: value}`` of the dashboard's query variables as a fresh dashboard starts: the current
    value, or for "All" the variable's ``allValue`` (a regex)."""
    dashboard = dashboard or load_dashboard()
    values = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        current = var["current"]["value"]
        current = current[0] if isinstance(current, list) else current
        values[var["name"]] = var["allValue"] if current == "$__all" else current
    return values


def concrete_dashboard_expr(expr: str, values: dict[str, str]) -> str:
    """``expr`` with ``$name`` / ``${name}`` of each template variable replaced; ``$__rate_interval``
    stays (Grafana's own)."""
    for name, value in values.items():
        expr = re.sub(r"\$\{" + name + r"\}|\$" + name + r"\b", lambda _match, value=value: value, expr)
    return expr


def deploy_expressions() -> list[tuple[str, str]]:
    """``(where, expr)`` for every PromQL expression in the dashboard, the rules and the KEDA
    ScaledObjects (base and GPU overlay source files), concrete for a Prometheus outside Kubernetes
    (see the module docstring). Grafana's ``$__rate_interval`` is kept."""
    out: list[tuple[str, str]] = []
    dashboard = load_dashboard()
    values = dashboard_variable_defaults(dashboard)
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"dashboard:{panel['title']}:{target['refId']}", concrete_dashboard_expr(target["expr"], values)))
    for rule in load_rules():
        name = rule.get("record") or rule.get("alert")
        out.append((f"rule:{name}", rule["expr"].strip()))
    for path in sorted((DEPLOY / "k8s").rglob("scaledobject*.yaml")):
        doc = yaml.safe_load(path.read_text())
        for trigger in doc["spec"].get("triggers", []):
            if trigger["type"] == "prometheus":
                query = re.sub(r'namespace="[^"]*",\s*', "", trigger["metadata"]["query"])
                out.append((f"keda:{path.relative_to(DEPLOY)}", query))
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

    names: set[str] = set(PROCESS_METRICS)
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


def strict_crd_schema(schema: dict) -> dict:
    """A copy of a CRD's openAPIV3Schema in which every object that lists ``properties`` and says
    nothing about other fields (no ``additionalProperties``, no ``x-kubernetes-preserve-unknown-fields``)
    gets ``additionalProperties: false``. That is the API server's strict field validation (kubectl's
    default ``--validate=strict``: unknown fields are errors); the plain schema would accept a typo.
    ``metadata`` is left open: the API server checks ObjectMeta itself. Patterns are Go (RE2) regular
    expressions; the one construct Python's ``re`` reads differently, an inline flag group right after
    ``^`` (the PrometheusRule CRD's ``^(?i)(abort|warn)?$``), is moved in front of the ``^``, which
    means the same. Validate with check-jsonschema ``--regex-variant python``."""

    def walk(node: dict) -> dict:
        out = dict(node)
        if "properties" in node:
            out["properties"] = {name: walk(sub) for name, sub in node["properties"].items()}
            if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                out["additionalProperties"] = False
        if isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = walk(node["additionalProperties"])
        if isinstance(node.get("items"), dict):
            out["items"] = walk(node["items"])
        if isinstance(node.get("pattern"), str):
            out["pattern"] = re.sub(r"^\^(\(\?[a-zA-Z]+\))", r"\1^", node["pattern"])
        for key in ("allOf", "anyOf", "oneOf"):
            if key in node:
                out[key] = [walk(sub) for sub in node[key]]
        return out

    strict = walk(schema)
    strict["properties"]["metadata"] = schema["properties"]["metadata"]
    return strict
