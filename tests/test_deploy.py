"""Static checks of deploy/ with the real tools: promtool, check-jsonschema (compose spec; the custom
resources against the upstream KEDA and Prometheus Operator CRD schemas in deploy/schemas/),
kubectl kustomize + kubernetes-validate (Kubernetes schemas).

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
import urllib.parse
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from deploy_support import (
    DASHBOARD,
    DEPLOY,
    EXTERNAL_METRICS,
    K8S_BASE,
    K8S_GPU,
    ROOT,
    RULE_TESTS,
    RULES,
    SCHEMAS,
    deploy_expressions,
    ensure_tool,
    exported_metric_names,
    load_dashboard,
    load_rules,
    metric_names,
    recorded_names,
    render_kustomize,
    strict_crd_schema,
)

from worker.config import Settings

K8S_VERSION = "1.30.0"
SETTINGS_ENV = {f"TAGSTREAM_{name.upper()}" for name in Settings.model_fields}
# Upstream CRD schemas (openAPIV3Schema extracts; each file's x-tagstream-source names release and file).
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCHEMAS / "keda.sh-v1alpha1-scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): SCHEMAS / "keda.sh-v1alpha1-triggerauthentication.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SCHEMAS / "monitoring.coreos.com-v1-servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): SCHEMAS / "monitoring.coreos.com-v1-prometheusrule.json",
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
DASHBOARD_MATCHERS = ('namespace=~"$namespace"', 'job=~"$job"', 'instance=~"$instance"')


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
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs))
        assert all(t["expr"].strip() for t in p["targets"])
    provisioned = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert provisioned["datasources"][0]["uid"] == "prometheus"


def test_dashboard_variables_are_used_by_every_query():
    """No hard-coded datasource uid: a datasource variable (defaulting to the provisioned one) feeds every
    panel, query and variable; every selector of every query filters on namespace, job and instance."""
    dash = load_dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert set(variables) == {"datasource", "namespace", "job", "instance"}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "prometheus"  # compose's provisioned uid
    assert variables["job"]["current"]["value"] == "tagstream-worker"  # the job the rules select on
    for name in ("namespace", "instance"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*", name
    ds = {"type": "prometheus", "uid": "${datasource}"}
    for name in ("namespace", "job", "instance"):
        assert variables[name]["datasource"] == ds, name
    selector = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^{}]*)\}")
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == ds, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ds, p["title"]
            names = metric_names(t["expr"])
            selected = {m.group(1): m.group(2) for m in selector.finditer(t["expr"])}
            assert names <= set(selected), f"{p['title']}: a selector without matchers in {t['expr']}"
            for name in names:
                for match in selector.finditer(t["expr"]):
                    if match.group(1) == name:
                        assert all(m in match.group(2) for m in DASHBOARD_MATCHERS), f"{p['title']}: {t['expr']}"


def test_dashboard_covers_every_concern():
    exprs = " ".join(t["expr"] for p in load_dashboard()["panels"] for t in p.get("targets", []))
    for needle in ("tagstream_videos_total", "tagstream_video_seconds_total", "histogram_quantile(0.5,",
                   "histogram_quantile(0.95,", "histogram_quantile(0.99,", "tagstream_queue_jobs",
                   "tagstream_in_flight_videos", "tagstream_batch_size", "tagstream_errors_total",
                   "up{", "tagstream_ready", "tagstream_gpu_memory_bytes", "tagstream_redis_errors_total",
                   "process_resident_memory_bytes", "rate(process_cpu_seconds_total"):  # fmt: skip
        assert needle in exprs, needle
    # Everything the worker exports under tagstream_ is on some panel.
    shown = set().union(*(metric_names(t["expr"]) for p in load_dashboard()["panels"] for t in p.get("targets", [])))
    tagstream = {n for n in exported_metric_names() if n.startswith("tagstream_")}
    histogram_parts = {n for n in tagstream if n.endswith(("_bucket", "_sum", "_count"))}
    missing = {n for n in tagstream - shown - histogram_parts}
    missing |= {n.rsplit("_", 1)[0] for n in histogram_parts} - {n.rsplit("_", 1)[0] for n in shown}
    assert not missing, f"exported but on no panel: {sorted(missing)}"


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
def _strict_schema_file(key: tuple[str, str], tmp: Path) -> Path:
    """The upstream CRD schema of ``key`` made strict (:func:`strict_crd_schema`), written for check-jsonschema."""
    schema = json.loads(CRD_SCHEMAS[key].read_text())
    path = tmp / (CRD_SCHEMAS[key].stem + ".strict.json")
    path.write_text(json.dumps(strict_crd_schema(schema)))
    return path


def _check_crds(objects: list[dict], tmp: Path) -> subprocess.CompletedProcess | None:
    """check-jsonschema on every custom resource in ``objects`` against its upstream CRD schema; None
    when all pass, else the first failing run."""
    by_kind: dict[tuple[str, str], list[Path]] = {}
    for i, obj in enumerate(objects):
        key = (obj["apiVersion"], obj["kind"])
        instance = tmp / f"{i}-{obj['kind']}-{obj['metadata']['name']}.json"
        instance.write_text(json.dumps(obj))
        by_kind.setdefault(key, []).append(instance)
    for key, instances in by_kind.items():
        proc = _run([_check_jsonschema(), "--regex-variant", "python", "--schemafile", str(_strict_schema_file(key, tmp)),
                     *map(str, instances)])  # fmt: skip
        if proc.returncode != 0:
            return proc
    return None


def _validate_objects(objects: list[dict], tmp: Path) -> list[str]:
    """Built-in kinds with kubernetes-validate (strict), custom resources with check-jsonschema against the
    upstream CRD schemas (deploy/schemas/); returns the kinds."""
    custom = [o for o in objects if (o["apiVersion"], o["kind"]) in CRD_SCHEMAS]
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) not in CRD_SCHEMAS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    failed = _check_crds(custom, tmp)
    assert failed is None, failed.stdout + failed.stderr
    return [o["kind"] for o in objects]


def _by_kind(objects: list[dict]) -> dict[str, dict]:
    """kind -> object; for the two ConfigMaps, the worker's settings under "ConfigMap" and the dashboard
    under "DashboardConfigMap"."""
    out = {}
    for obj in objects:
        kind = obj["kind"]
        if kind == "ConfigMap" and obj["metadata"]["name"] == "tagstream-grafana-dashboard":
            kind = "DashboardConfigMap"
        assert kind not in out, f"two {kind}s"
        out[kind] = obj
    return out


def test_crd_schemas_are_upstream_extracts():
    """deploy/schemas holds the upstream CRDs' openAPIV3Schema, each naming its source; none of the old
    hand-written subsets is left."""
    assert {p.name for p in SCHEMAS.glob("*.json")} == {p.name for p in CRD_SCHEMAS.values()}
    for (api_version, kind), path in CRD_SCHEMAS.items():
        schema = json.loads(path.read_text())
        source = schema["x-tagstream-source"]
        group, version = api_version.split("/")
        assert source["crd"] == f"{kind.lower()}s.{group}" and source["version"] == version, path.name
        assert source["repository"] in {"kedacore/keda", "prometheus-operator/prometheus-operator"}
        assert re.fullmatch(r"v\d+\.\d+\.\d+", source["ref"]) and re.fullmatch(r"[0-9a-f]{40}", source["commit"])
        assert source["path"].endswith(f"{group}_{kind.lower()}s.yaml")
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(schema["properties"])


@pytest.mark.parametrize("path", [K8S_BASE, K8S_GPU], ids=["base", "gpu"])
def test_kustomize_output_validates(path, tmp_path):
    objects = render_kustomize(path)
    kinds = _validate_objects(objects, tmp_path)
    assert sorted(kinds) == sorted(["Namespace", "ConfigMap", "ConfigMap", "Secret", "Service", "Deployment",
                                    "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PrometheusRule",
                                    "TriggerAuthentication", "ScaledObject"])  # fmt: skip
    assert all(o["metadata"].get("namespace") == "tagstream" for o in objects if o["kind"] != "Namespace")


def test_validators_reject_broken_manifests(tmp_path):
    objects = _by_kind(render_kustomize(K8S_GPU))

    def broken(kind: str, change) -> dict:
        obj = json.loads(json.dumps(objects[kind]))
        change(obj)
        return obj

    deployment = broken("Deployment", lambda o: o["spec"]["template"]["spec"].update(terminationGracePeriodSecond=90))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    cases = {
        "a misspelt ScaledObject field": broken("ScaledObject", lambda o: o["spec"].update(cooldown=300)),
        "a number as trigger metadata": broken("ScaledObject", lambda o: o["spec"]["triggers"][0]["metadata"].update(threshold=8)),
        "a fallback without replicas": broken("ScaledObject", lambda o: o["spec"]["fallback"].pop("replicas")),
        "a secretTargetRef without key": broken("TriggerAuthentication", lambda o: o["spec"]["secretTargetRef"][0].pop("key")),
        "a ServiceMonitor without endpoints": broken("ServiceMonitor", lambda o: o["spec"].pop("endpoints")),
        "a scrape interval in words": broken("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(interval="15 seconds")),
        "a rule without expr": broken("PrometheusRule", lambda o: o["spec"]["groups"][1]["rules"][0].pop("expr")),
    }
    for what, obj in cases.items():
        assert _check_crds([obj], tmp_path) is not None, f"the CRD schema accepted {what}"


@pytest.mark.parametrize("path", [K8S_BASE, K8S_GPU], ids=["base", "gpu"])
def test_kubernetes_manifests_are_consistent(path):
    objs = _by_kind(render_kustomize(path))
    deployment, config = objs["Deployment"], objs["ConfigMap"]["data"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    gpu = path == K8S_GPU
    assert config["TAGSTREAM_DEVICE"] == ("cuda" if gpu else "cpu")
    assert (container["resources"]["limits"].get("nvidia.com/gpu") == 1) == gpu
    assert set(config) <= SETTINGS_ENV, set(config) - SETTINGS_ENV
    # Threads from the CPU request: decoders = requested cores; extractor batches at once = requested cores
    # on CPU, 1 on a GPU (the worker's own rule for an accelerator, Settings.resolved_inference_threads).
    cpus = int(container["resources"]["requests"]["cpu"])
    assert int(config["TAGSTREAM_DECODE_THREADS"]) == cpus
    assert int(config["TAGSTREAM_INFERENCE_THREADS"]) == (1 if gpu else cpus)
    assert "cpu" not in container["resources"].get("limits", {})  # why the threads must be explicit
    # Secret: the workers' URL, and the same server and password for KEDA's Redis scaler.
    secret = objs["Secret"]["stringData"]
    assert set(secret) == {"TAGSTREAM_REDIS_URL", "KEDA_REDIS_ADDRESS", "KEDA_REDIS_PASSWORD"}
    url = urllib.parse.urlsplit(secret["TAGSTREAM_REDIS_URL"])
    assert url.scheme in ("redis", "rediss") and url.password
    assert secret["KEDA_REDIS_ADDRESS"] == f"{url.hostname}:{url.port}"
    assert secret["KEDA_REDIS_PASSWORD"] == urllib.parse.unquote(url.password)
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
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        selector = objs[kind]["spec"].get("selector") or objs[kind]["spec"]["podSelector"]
        assert selector["matchLabels"].items() <= pod_labels.items(), kind
    # A Redis outage makes every worker unready at once; a drain must still be able to evict them.
    assert objs["PodDisruptionBudget"]["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow"
    assert objs["Service"]["spec"]["selector"].items() <= pod_labels.items()
    assert objs["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= objs["Service"]["metadata"]["labels"].items()
    assert objs["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == objs["Service"]["spec"]["ports"][0]["name"]
    assert objs["Service"]["metadata"]["name"] == "tagstream-worker"  # the job label the rules select on
    # The ScaledObject.
    scaled_obj = objs["ScaledObject"]
    scaled = scaled_obj["spec"]
    concurrency = config["TAGSTREAM_CONCURRENCY"]
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["minReplicaCount"] == (0 if gpu else 1) and scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    # cooldownPeriod is KEDA's wait before going to zero, nothing else; the scale-down delay is the HPA's
    # stabilization window, and it must outlast a short lull.
    behavior = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 60
    if scaled["minReplicaCount"] == 0:
        assert scaled["cooldownPeriod"] >= 60
    assert 0 < scaled["fallback"]["replicas"] <= scaled["maxReplicaCount"] and scaled["fallback"]["failureThreshold"] >= 1
    triggers = {t["name"]: t for t in scaled["triggers"]}
    assert set(triggers) == {"backlog", "queue"}
    backlog, queue = triggers["backlog"], triggers["queue"]
    assert backlog["type"] == "prometheus" and backlog.get("metricType", "AverageValue") == "AverageValue"
    query = backlog["metadata"]["query"]
    assert 'state=~"queued|started"' in query and "max by" in query
    assert f'queue="{config["TAGSTREAM_QUEUE"]}"' in query and 'job="tagstream-worker"' in query
    # The query selects this deployment's own series: its namespace is where kustomize put the objects.
    assert re.search(r'namespace="([^"]*)"', query).group(1) == scaled_obj["metadata"]["namespace"]
    # Target per replica = its in-flight capacity, so N saturated replicas want N.
    assert backlog["metadata"]["threshold"] == concurrency
    assert float(backlog["metadata"]["activationThreshold"]) == 0
    assert queue["type"] == "redis" and queue.get("metricType", "AverageValue") == "AverageValue"
    assert queue["metadata"]["listName"] == f"rq:queue:{config['TAGSTREAM_QUEUE']}"
    assert queue["metadata"]["listLength"] == concurrency
    assert float(queue["metadata"]["activationListLength"]) == 0
    assert queue["metadata"]["databaseIndex"] == (url.path.lstrip("/") or "0")
    # KEDA's Redis credentials come from the workers' Secret.
    auth = objs["TriggerAuthentication"]
    assert queue["authenticationRef"]["name"] == auth["metadata"]["name"]
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"address", "password"}
    for ref in refs.values():
        assert ref["name"] == objs["Secret"]["metadata"]["name"] and ref["key"] in secret
    assert {e.get("secretRef", {}).get("name") for e in container["envFrom"]} >= {objs["Secret"]["metadata"]["name"]}
    # NetworkPolicy: scraped from Prometheus's namespace on the metrics port; out to DNS, Redis, HTTP(S).
    policy = objs["NetworkPolicy"]["spec"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    prometheus_ns = urllib.parse.urlsplit(backlog["metadata"]["serverAddress"]).hostname.split(".")[1]
    (ingress,) = policy["ingress"]
    assert [f["namespaceSelector"]["matchLabels"] for f in ingress["from"]] == [{"kubernetes.io/metadata.name": prometheus_ns}]
    assert [p["port"] for p in ingress["ports"]] == ["metrics"]
    egress = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress == {("UDP", 53), ("TCP", 53), ("TCP", url.port), ("TCP", 443), ("TCP", 80)}


def test_config_change_is_a_rollout(tmp_path):
    """The worker ConfigMap is generated with a content hash in its name, the Deployment refers to that
    name, and changing a value changes it (so applying is a rollout)."""
    objs = _by_kind(render_kustomize(K8S_GPU))
    name = objs["ConfigMap"]["metadata"]["name"]
    assert re.fullmatch(r"tagstream-worker-[a-z0-9]{10}", name), name
    refs = [e["configMapRef"]["name"] for e in objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["envFrom"]
            if "configMapRef" in e]  # fmt: skip
    assert refs == [name]
    copy = tmp_path / "deploy"
    for part in ("k8s", "grafana"):
        shutil.copytree(DEPLOY / part, copy / part)
    base_env = copy / "k8s" / "base" / "worker.env"
    base_env.write_text(base_env.read_text().replace("TAGSTREAM_LOG_LEVEL=INFO", "TAGSTREAM_LOG_LEVEL=DEBUG"))
    changed = _by_kind(render_kustomize(copy / "k8s" / "overlays" / "gpu"))
    new_name = changed["ConfigMap"]["metadata"]["name"]
    assert new_name != name and changed["ConfigMap"]["data"]["TAGSTREAM_LOG_LEVEL"] == "DEBUG"
    assert changed["Deployment"]["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"] == new_name
    # The overlay's own values are merged over the base's, and the autoscaling target follows them.
    gpu_env = copy / "k8s" / "overlays" / "gpu" / "worker-gpu.env"
    gpu_env.write_text(gpu_env.read_text().replace("TAGSTREAM_CONCURRENCY=16", "TAGSTREAM_CONCURRENCY=12"))
    changed = _by_kind(render_kustomize(copy / "k8s" / "overlays" / "gpu"))
    assert changed["ConfigMap"]["metadata"]["name"] not in (name, new_name)
    assert changed["ConfigMap"]["data"]["TAGSTREAM_LOG_LEVEL"] == "DEBUG"  # from the base
    thresholds = {t["name"]: t["metadata"] for t in changed["ScaledObject"]["spec"]["triggers"]}
    assert thresholds["backlog"]["threshold"] == thresholds["queue"]["listLength"] == "12"


def test_prometheus_rule_and_dashboard_configmap_match_their_sources(promtool, tmp_path):
    """For Prometheus Operator / Grafana sidecar users: the PrometheusRule carries exactly the rule file's
    groups, and the dashboard ConfigMap exactly the dashboard file."""
    proc = _run([sys.executable, str(ROOT / "scripts" / "gen_k8s_monitoring.py"), "--check"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    objs = _by_kind(render_kustomize(K8S_BASE))
    assert objs["PrometheusRule"]["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    extracted = tmp_path / "prometheusrule-groups.yaml"
    extracted.write_text(yaml.safe_dump({"groups": objs["PrometheusRule"]["spec"]["groups"]}, sort_keys=False))
    proc = _run([promtool, "check", "rules", str(extracted)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dashboard = objs["DashboardConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["name"] == "tagstream-grafana-dashboard"  # no hash: one ConfigMap, one uid
    assert dashboard["data"] == {"tagstream.json": DASHBOARD.read_text()}


def test_generator_detects_a_desynced_prometheus_rule(tmp_path):
    """scripts/gen_k8s_monitoring.py --check fails when the rules file changed and the PrometheusRule did not."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_k8s_monitoring
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    committed = (K8S_BASE / "prometheusrule.yaml").read_text()
    assert gen_k8s_monitoring.render(RULES.read_text()) == committed
    assert gen_k8s_monitoring.render(RULES.read_text().replace("> 0.05", "> 0.5")) != committed


def _slug(heading: str) -> str:
    """The anchor a Markdown renderer (GitHub's rules) gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_a_runbook_section():
    docs = (ROOT / "docs" / "production.md").read_text()
    runbook = docs.split("\n## Runbook\n", 1)[1].split("\n## ", 1)[0]
    sections = {_slug(h) for h in re.findall(r"^### (.+)$", runbook, re.M)}
    alerts = [r for r in load_rules() if "alert" in r]
    for rule in alerts:
        url = rule["annotations"]["runbook_url"]
        page, anchor = url.split("#")
        assert page == "docs/production.md" and anchor == rule["alert"].lower(), url
        assert anchor in sections, f"no runbook section for {rule['alert']}"
    assert len(sections) == len(alerts)


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
    assert re.search(r"^COPY requirements/requirements-runtime-py\*\.txt", instructions, re.M)
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
