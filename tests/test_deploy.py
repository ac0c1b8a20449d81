"""Static checks of deploy/ with the real tools: promtool, check-jsonschema (compose spec),
kubectl kustomize + kubernetes-validate (Kubernetes schemas) and JSON schemas for the CRDs.

Also checks that every metric the dashboard, the rules and the autoscaler query is exported by
worker/metrics.py, and that the shutdown budgets of compose, Kubernetes and the worker agree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_support import (
    DEPLOY,
    EXTERNAL_METRICS,
    K8S_BASE,
    K8S_GPU,
    ROOT,
    RULE_TESTS,
    RULES,
    deploy_expressions,
    ensure_tool,
    exported_metric_names,
    load_dashboard,
    metric_names,
    recorded_names,
    render_kustomize,
)

from worker.config import Settings

K8S_VERSION = "1.30.0"
SETTINGS_ENV = {f"TAGSTREAM_{name.upper()}" for name in Settings.model_fields}
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): DEPLOY / "schemas" / "scaledobject-keda.sh-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): DEPLOY / "schemas" / "servicemonitor-monitoring.coreos.com-v1.json",
}


@pytest.fixture(scope="session")
def promtool() -> str:
    return ensure_tool("promtool", "prometheus")


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


# --- Prometheus -------------------------------------------------------------------------------------
def test_promtool_checks_rules_and_config(promtool):
    proc = _run([promtool, "check", "rules", str(RULES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
    proc = _run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_rule_unit_tests_pass(promtool):
    proc = _run([promtool, "test", "rules", str(RULE_TESTS)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_firing_and_a_silent_unit_test():
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] if "alert" in rule}
    fired, silent = set(), set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    assert alerts == fired, f"alerts without a firing test: {alerts - fired}"
    assert alerts == silent, f"alerts without a silent test: {alerts - silent}"
    assert {"TagstreamBacklogGrowing", "TagstreamLatencyHigh", "TagstreamFailureRatioHigh", "TagstreamNoWorkers",
            "TagstreamOrphanedJobs", "TagstreamGpuMemoryNearLimit"} <= alerts  # fmt: skip


def test_rule_unit_tests_catch_a_broken_rule(promtool, tmp_path):
    """The unit tests have teeth: a wrong threshold makes them fail."""
    broken = tmp_path / "rules" / "tagstream.rules.yaml"
    broken.parent.mkdir()
    broken.write_text(RULES.read_text().replace("> 0.05", "> 0.5"))
    tests = tmp_path / "tests" / "t.yaml"
    tests.parent.mkdir()
    tests.write_text(RULE_TESTS.read_text())
    proc = _run([promtool, "test", "rules", str(tests)])
    assert proc.returncode != 0
    assert "TagstreamFailureRatioHigh" in proc.stdout + proc.stderr


# --- metric names -------------------------------------------------------------------------------------
def test_metric_name_parser():
    assert metric_names('sum by (le, stage) (rate(tagstream_stage_duration_seconds_bucket{stage="total"}[5m]))') == {
        "tagstream_stage_duration_seconds_bucket"
    }
    assert metric_names('absent(up{job="tagstream-worker"} == 1)') == {"up"}
    assert metric_names("a / ignoring (reason) group_left sum(rate(b_total[$__rate_interval])) > 0.05 and c") == {
        "a", "b_total", "c"
    }  # fmt: skip


def test_every_queried_metric_is_exported():
    exported = exported_metric_names()
    assert "tagstream_stage_duration_seconds_bucket" in exported and "tagstream_videos_total" in exported
    allowed = exported | EXTERNAL_METRICS | recorded_names()
    expressions = deploy_expressions()
    assert len(expressions) > 30
    unknown = {(where, name) for where, expr in expressions for name in metric_names(expr) if name not in allowed}
    assert not unknown, f"queries reference metrics the worker does not export: {sorted(unknown)}"


def test_recording_rules_follow_naming_convention():
    for name in recorded_names():
        assert re.fullmatch(r"tagstream:[a-z_]+(:[a-z0-9_]+)?", name), name


# --- Grafana dashboard ---------------------------------------------------------------------------------
def test_dashboard_structure():
    dash = load_dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ["Throughput", "Latency", "Queue", "Workers", "Batching", "Failures", "GPU"]
    cells: set[tuple[int, int]] = set()
    for p in panels:
        grid = p["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), p["title"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, p["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["title"][0].isupper() and "_" not in p["title"], f"plain-word title: {p['title']}"
        assert p["datasource"]["uid"] == "prometheus"
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs))
        assert all(t["expr"].strip() for t in p["targets"])
    provisioned = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert provisioned["datasources"][0]["uid"] == "prometheus"


def test_dashboard_covers_every_concern():
    exprs = " ".join(t["expr"] for p in load_dashboard()["panels"] for t in p.get("targets", []))
    for needle in ("tagstream_videos_total", "tagstream_video_seconds_total", "histogram_quantile(0.5,",
                   "histogram_quantile(0.95,", "histogram_quantile(0.99,", "tagstream_queue_jobs",
                   "tagstream_in_flight_videos", "tagstream_batch_size", "tagstream_errors_total",
                   'up{job="tagstream-worker"}', "tagstream_ready", "tagstream_gpu_memory_bytes"):  # fmt: skip
        assert needle in exprs, needle


# --- compose -------------------------------------------------------------------------------------------
def _check_jsonschema() -> str:
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).with_name("check-jsonschema"))
    assert Path(exe).exists(), "pip install check-jsonschema"
    return exe


def test_compose_validates_against_compose_spec(tmp_path):
    exe = _check_jsonschema()
    compose = DEPLOY / "compose.yaml"
    proc = _run([exe, "--builtin-schema", "vendor.compose-spec", str(compose)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(compose.read_text().replace("stop_grace_period: 90s", "stop_grace_period: [90]"))
    proc = _run([exe, "--builtin-schema", "vendor.compose-spec", str(broken)])
    assert proc.returncode != 0, "the validator accepted a broken compose file"


def _seconds(text: str) -> float:
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        total += float(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def test_compose_contents():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--requirepass" in redis_cmd
    grace = float(Settings().shutdown_grace_s)
    workers = {name: s for name, s in services.items() if name.startswith("worker")}
    assert set(workers) == {"worker", "worker-cpu", "worker-multigpu"}
    for name, svc in workers.items():
        env = svc["environment"]
        assert set(k for k in env if k.startswith("TAGSTREAM_")) <= SETTINGS_ENV, name
        assert "@redis:6379" in env["TAGSTREAM_REDIS_URL"] and "${REDIS_PASSWORD" in env["TAGSTREAM_REDIS_URL"]
        assert _seconds(svc["stop_grace_period"]) >= grace + 20, name
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
    gpu = workers["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["count"] == 1 and "gpu" in gpu["capabilities"]
    assert workers["worker"]["profiles"] == ["gpu"] and workers["worker-cpu"]["profiles"] == ["cpu"]
    assert "resources" not in workers["worker-cpu"].get("deploy", {})
    assert workers["worker-cpu"]["environment"]["TAGSTREAM_DEVICE"] == "cpu"
    assert workers["worker-multigpu"]["command"] == ["worker", "--gpus", "all"]
    assert services["rq-dashboard"]["profiles"] == ["tools"]
    # Prometheus discovers every worker service by DNS, with the job name the rules select on.
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "tagstream-worker")
    names = {n for sd in job["dns_sd_configs"] for n in sd["names"]}
    assert names == set(workers)
    assert any("/etc/prometheus/rules" in v for v in services["prometheus"]["volumes"])
    grafana_volumes = " ".join(services["grafana"]["volumes"])
    assert "./grafana/provisioning:/etc/grafana/provisioning" in grafana_volumes
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "tagstream.yaml").read_text())
    assert f"./grafana/dashboards:{provider['providers'][0]['options']['path']}" in grafana_volumes


# --- Kubernetes ------------------------------------------------------------------------------------------
def _validate_objects(objects: list[dict]) -> list[str]:
    kinds = []
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"])
        if key in CRD_SCHEMAS:
            jsonschema.validate(obj, json.loads(CRD_SCHEMAS[key].read_text()))
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        kinds.append(obj["kind"])
    return kinds


@pytest.mark.parametrize("path", [K8S_BASE, K8S_GPU], ids=["base", "gpu"])
def test_kustomize_output_validates(path):
    objects = render_kustomize(path)
    kinds = _validate_objects(objects)
    assert sorted(kinds) == sorted(["Namespace", "ConfigMap", "Secret", "Service", "Deployment",
                                    "PodDisruptionBudget", "ServiceMonitor", "ScaledObject"])  # fmt: skip
    assert all(o["metadata"].get("namespace") == "tagstream" for o in objects if o["kind"] != "Namespace")


def test_validators_reject_broken_manifests():
    objects = {o["kind"]: o for o in render_kustomize(K8S_GPU)}
    deployment = json.loads(json.dumps(objects["Deployment"]))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 90
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    scaled = json.loads(json.dumps(objects["ScaledObject"]))
    scaled["spec"]["cooldown"] = 300
    with pytest.raises(jsonschema.ValidationError):
        _validate_objects([scaled])
    monitor = json.loads(json.dumps(objects["ServiceMonitor"]))
    del monitor["spec"]["endpoints"]
    with pytest.raises(jsonschema.ValidationError):
        _validate_objects([monitor])


def test_kubernetes_manifests_are_consistent():
    objs = {o["kind"]: o for o in render_kustomize(K8S_GPU)}
    deployment, config = objs["Deployment"], objs["ConfigMap"]["data"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert config["TAGSTREAM_DEVICE"] == "cuda"
    assert set(config) <= SETTINGS_ENV, set(config) - SETTINGS_ENV
    assert set(objs["Secret"]["stringData"]) == {"TAGSTREAM_REDIS_URL"}
    assert re.match(r"rediss?://[^@]*:[^@]+@", objs["Secret"]["stringData"]["TAGSTREAM_REDIS_URL"])
    port = next(p for p in container["ports"] if p["name"] == "metrics")
    assert port["containerPort"] == int(config["TAGSTREAM_METRICS_PORT"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["port"] == "metrics"
    # Kubelet's SIGKILL must come after preStop + the worker's own drain, with room to hand back.
    pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    sleep_s = float(re.search(r"sleep (\d+)", pre_stop).group(1))
    grace = float(config["TAGSTREAM_SHUTDOWN_GRACE_S"])
    assert pod["spec"]["terminationGracePeriodSeconds"] >= sleep_s + grace + 20
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod_labels = pod["metadata"]["labels"]
    for kind in ("PodDisruptionBudget",):
        assert objs[kind]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert objs["Service"]["spec"]["selector"].items() <= pod_labels.items()
    assert objs["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= objs["Service"]["metadata"]["labels"].items()
    assert objs["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == objs["Service"]["spec"]["ports"][0]["name"]
    assert objs["Service"]["metadata"]["name"] == "tagstream-worker"  # the job label the rules select on
    scaled = objs["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    assert scaled["cooldownPeriod"] >= 60
    trigger = scaled["triggers"][0]
    assert trigger["type"] == "prometheus"
    assert 'state=~"queued|started"' in trigger["metadata"]["query"] and "max by" in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) >= int(config["TAGSTREAM_CONCURRENCY"])


# --- container image -------------------------------------------------------------------------------------
def test_dockerfile_essentials():
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = re.sub(r"\\\n", " ", text)
    user = re.findall(r"^USER\s+(\S+)", instructions, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    entry = re.search(r"^ENTRYPOINT\s+(.*)$", instructions, re.M).group(1)
    entry_list = json.loads(entry)  # exec form, so SIGTERM reaches tini and the worker
    assert entry_list[0].endswith("tini")
    health = re.search(r"^HEALTHCHECK\s+(.*)$", instructions, re.M).group(1)
    assert "/healthz" in health and "CMD" in health
    assert re.search(r"^ARG WEIGHTS_DIR=", instructions, re.M)
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    # dependencies from the runtime lock, hashes checked, before the sources are copied; the project without deps
    assert re.search(r"^COPY requirements/runtime-py\*\.txt", instructions, re.M)
    assert "pip install --require-hashes -r" in instructions and "pip install --no-deps" in instructions
    assert instructions.index("--require-hashes") < instructions.index("COPY worker")
    for needed in ("worker", "model", "pyproject.toml", "README.md", "deploy/docker-entrypoint.sh", "deploy/weights",
                   "requirements"):
        assert needed not in ignore and needed.split("/")[0] not in ignore, needed
    assert ".venv" in ignore and ".git" in ignore


def test_entrypoint_maps_weights_to_settings(tmp_path):
    """The image's entrypoint, run for real with a stand-in ``tagstream`` that prints its env."""
    script = DEPLOY / "docker-entrypoint.sh"
    assert _run(["sh", "-n", str(script)]).returncode == 0
    weights = tmp_path / "weights"
    (weights / "checkpoint").mkdir(parents=True)
    (weights / "checkpoint" / "model.safetensors").write_bytes(b"x")
    (weights / "vggish.pth").write_bytes(b"x")
    (weights / "text-encoder").mkdir()
    (weights / "text-encoder" / "config.json").write_text("{}")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "tagstream"
    fake.write_text('#!/bin/sh\necho "ARGS=$*"\nenv | grep ^TAGSTREAM_ | sort\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "TAGSTREAM_WEIGHTS_DIR": str(weights), "TAGSTREAM_VGGISH_WEIGHTS": "/explicit.pth"}
    proc = _run(["sh", str(script), "worker", "--gpus", "all"], env=env)
    assert proc.returncode == 0, proc.stderr
    lines = set(proc.stdout.splitlines())
    assert "ARGS=worker --gpus all" in lines
    assert f"TAGSTREAM_CHECKPOINT={weights}/checkpoint" in lines
    assert f"TAGSTREAM_TEXT_ENCODER_DIR={weights}/text-encoder" in lines
    assert "TAGSTREAM_VGGISH_WEIGHTS=/explicit.pth" in lines  # explicit settings win
    assert not any(line.startswith("TAGSTREAM_IMAGE_WEIGHTS=") for line in lines)  # no file, no setting
    names = set(re.findall(r"TAGSTREAM_[A-Z_]+", script.read_text())) - {"TAGSTREAM_WEIGHTS_DIR"}
    assert names <= SETTINGS_ENV, names - SETTINGS_ENV
    assert os.access(script, os.X_OK)
