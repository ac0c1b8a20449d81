"""The workers' autoscaling, simulated: KEDA and the Kubernetes HPA on a generated load trace.

No cluster runs here, so this is a model of the documented algorithms, not a run of KEDA. Every number
of the autoscaler comes from the rendered manifests (``kubectl kustomize`` of deploy/k8s/base and
deploy/k8s/overlays/gpu, :func:`deploy_support.render_kustomize`): min/max replicas, pollingInterval,
cooldownPeriod, fallback, the HPA behavior (stabilization windows, policies, selectPolicy), both triggers'
targets and activation values, ignoreNullValues, TAGSTREAM_CONCURRENCY, the shutdown grace, the preStop
sleep and the scrape interval. The sources of the algorithm, by name:

- Kubernetes documentation, "Horizontal Pod Autoscaling", section "Algorithm details": desired =
  ceil(current x metric / target); for an External metric with an AverageValue target the metric per pod
  is the total divided by the current replicas (status.replicas), so desired = ceil(total / target),
  except that the HPA keeps the current count while |1 - ratio| <= tolerance (0.1 by default); with
  several metrics it takes the largest proposal; when a metric cannot be fetched and the others propose a
  scale-down, it does not scale. Section "Configurable scaling behavior": the stabilization windows (the
  highest recommendation of the scale-down window, the lowest of the scale-up window), the policies
  (Pods / Percent change per periodSeconds, counted from the replicas at the start of the period) and
  selectPolicy (Max by default). The HPA controller runs every 15 s (kube-controller-manager's
  --horizontal-pod-autoscaler-sync-period default).
- KEDA documentation, "ScaledObject specification" (pollingInterval, cooldownPeriod, minReplicaCount,
  fallback, advanced.horizontalPodAutoscalerConfig) and "Scaling Deployments" (the activation phase
  0 <-> 1 is KEDA's own, every pollingInterval: active while any trigger's value exceeds its activation
  value; the scaling phase 1 <-> N is the HPA's); the Prometheus scaler (threshold, activationThreshold,
  ignoreNullValues) and the Redis Lists scaler (listLength, activationListLength). The HPA KEDA creates
  has minReplicas = max(1, minReplicaCount).
- Where the documentation leaves details open, KEDA v2.20.2's code (the release whose CRD schemas are in
  deploy/schemas/): pkg/scaling/executor/scale_scaledobjects.go (scale from zero to max(1, min); scale to
  zero when no trigger is active and cooldownPeriod has passed since the last active poll; with a
  failing trigger and a fallback, no scale to zero), pkg/fallback/fallback.go (each failed read of a
  trigger, from the polling loop or from an HPA query, counts; once the consecutive failures exceed
  failureThreshold the trigger reports fallback.replicas x target, as active) and
  pkg/scalers/prometheus_scaler.go (an empty result is 0 with ignoreNullValues, else an error).

Model assumptions (not in the manifests, stated here): a job holds one of a worker's K slots for
SERVICE_S seconds; a new pod takes jobs and exports metrics STARTUP_S seconds after it is created (model
load); Prometheus scrapes every worker at the ServiceMonitor's interval and answers with the last scrape;
a worker being deleted takes jobs during its preStop sleep, then stops, finishes its jobs within
TAGSTREAM_SHUTDOWN_GRACE_S and hands the rest back to the queue; the ReplicaSet deletes pods that are not
ready first, then the most recently ready; the queue's jobs go to ready workers with free slots at once.
The trace: a burst of jobs arriving at once, a saturated period (queue at zero, every worker K jobs in
flight, arrivals = completions), a lull (no jobs), and a Prometheus outage with a trickle of jobs.

``python tests/test_autoscaling.py`` prints the replicas over the trace for both kustomizations.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import pytest
from deploy_support import K8S_BASE, K8S_GPU, render_kustomize

HPA_SYNC_S = 15  # kube-controller-manager --horizontal-pod-autoscaler-sync-period (default)
HPA_TOLERANCE = 0.1  # kube-controller-manager --horizontal-pod-autoscaler-tolerance (default)
SERVICE_S = 30  # model: seconds one job holds a slot
STARTUP_S = 60  # model: seconds from pod creation to taking jobs and exporting metrics (models load)

# The trace (seconds, jobs).
BURST_AT_S = 60
SATURATED_S = 1200
LULL_S = 1800
OUTAGE_S = 900
RECOVERY_S = 600
TRICKLE_EVERY_S = 10  # during the outage and after it: one job every 10 s, well below one worker's rate


# --- the manifests -----------------------------------------------------------------------------------------
@dataclass
class Policy:
    kind: str  # Pods or Percent
    value: int
    period_s: int


@dataclass
class Rules:
    window_s: int
    policies: list[Policy]
    select: str  # Max, Min or Disabled


@dataclass
class Trigger:
    name: str
    kind: str  # prometheus or redis
    target: float  # AverageValue target per replica
    activation: float


@dataclass
class Config:
    """Everything the simulation needs, from the rendered objects."""

    min_replicas: int
    max_replicas: int
    polling_s: int
    cooldown_s: int
    fallback_threshold: int  # -1: no fallback configured
    fallback_replicas: int
    up: Rules
    down: Rules
    triggers: list[Trigger]
    ignore_null_values: bool
    concurrency: int
    grace_s: float
    prestop_s: float
    scrape_s: int

    @property
    def hpa_min(self) -> int:
        return max(1, self.min_replicas)  # KEDA's HPA never has minReplicas 0


def _duration_s(text: str) -> int:
    return sum(int(v) * {"s": 1, "m": 60, "h": 3600}[u] for v, u in re.findall(r"(\d+)([smh])", text))


def _rules(spec: dict | None, default_window: int, default_policies: list[Policy]) -> Rules:
    # Kubernetes' defaults when a direction is not configured ("Default Behavior" in the HPA docs).
    spec = spec or {}
    policies = [Policy(p["type"], p["value"], p["periodSeconds"]) for p in spec.get("policies", [])]
    return Rules(spec.get("stabilizationWindowSeconds", default_window), policies or default_policies,
                 spec.get("selectPolicy", "Max"))  # fmt: skip


def load_config(objects: list[dict]) -> Config:
    by_kind = {o["kind"]: o for o in objects if not (o["kind"] == "ConfigMap" and "dashboard" in o["metadata"]["name"])}
    scaled = by_kind["ScaledObject"]["spec"]
    env = by_kind["ConfigMap"]["data"]
    container = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    behavior = scaled.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {})
    for direction in behavior.values():
        assert "tolerance" not in direction, "the model uses the cluster's default tolerance"
    triggers, ignore_null = [], True
    for t in scaled["triggers"]:
        assert t.get("metricType", "AverageValue") == "AverageValue"
        meta = t["metadata"]
        if t["type"] == "prometheus":
            triggers.append(Trigger(t.get("name", t["type"]), "prometheus", float(meta["threshold"]), float(meta.get("activationThreshold", 0))))
            ignore_null = meta.get("ignoreNullValues", "true").lower() == "true"
        elif t["type"] == "redis":
            triggers.append(Trigger(t.get("name", t["type"]), "redis", float(meta.get("listLength", 5)), float(meta.get("activationListLength", 0))))
        else:
            raise AssertionError(f"no model for trigger type {t['type']}")
    prestop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    return Config(
        min_replicas=scaled.get("minReplicaCount", 0),
        max_replicas=scaled.get("maxReplicaCount", 100),
        polling_s=scaled.get("pollingInterval", 30),
        cooldown_s=scaled.get("cooldownPeriod", 300),
        fallback_threshold=scaled["fallback"]["failureThreshold"] if "fallback" in scaled else -1,
        fallback_replicas=scaled["fallback"]["replicas"] if "fallback" in scaled else 0,
        up=_rules(behavior.get("scaleUp"), 0, [Policy("Percent", 100, 15), Policy("Pods", 4, 15)]),
        down=_rules(behavior.get("scaleDown"), 300, [Policy("Percent", 100, 15)]),
        triggers=triggers,
        ignore_null_values=ignore_null,
        concurrency=int(env["TAGSTREAM_CONCURRENCY"]),
        grace_s=float(env["TAGSTREAM_SHUTDOWN_GRACE_S"]),
        prestop_s=float(re.search(r"sleep (\d+)", prestop).group(1)),
        scrape_s=_duration_s(by_kind["ServiceMonitor"]["spec"]["endpoints"][0]["interval"]),
    )


# --- the model ---------------------------------------------------------------------------------------------
@dataclass
class Pod:
    created: int
    ready_at: int
    jobs: list[int] = field(default_factory=list)  # finish times of the jobs in flight
    deleted_at: int | None = None

    def takes_jobs(self, t: int, cfg: Config) -> bool:
        sigterm = None if self.deleted_at is None else self.deleted_at + cfg.prestop_s
        return t >= self.ready_at and (sigterm is None or t < sigterm)


@dataclass
class Read:
    value: float | None  # None: the read failed
    active: bool
    fallback: bool = False


@dataclass
class Sample:
    t: int
    phase: str
    queued: int
    in_flight: int
    replicas: int  # the Deployment's spec.replicas
    fallback: bool


@dataclass
class ScaleEvent:
    t: int
    phase: str
    by: str  # hpa or keda
    old: int
    new: int
    queued: int
    in_flight: int


@dataclass
class Run:
    cfg: Config
    burst_jobs: int
    samples: list[Sample] = field(default_factory=list)
    events: list[ScaleEvent] = field(default_factory=list)
    phase_start: dict[str, int] = field(default_factory=dict)
    handed_back: int = 0
    outage_failed_reads: int = 0  # reads that failed without a fallback during the outage

    def phase(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.phase == name]


class Simulation:
    """One second per step: completions and drains, arrivals and dispatch, scrape, KEDA poll, HPA sync."""

    def __init__(self, cfg: Config, burst_jobs: int) -> None:
        self.cfg = cfg
        self.run = Run(cfg, burst_jobs)
        self.queued = 0
        self.scraped: float | None = None  # Prometheus's last scrape of the backlog; None: no worker exports
        self.prometheus_down = False
        self.failures = {tr.name: 0 for tr in cfg.triggers}  # KEDA's consecutive failed reads per trigger
        self.last_active: int | None = None
        self.recommendations: list[tuple[int, int]] = []  # the HPA's (time, unstabilized recommendation)
        self.up_events: list[tuple[int, int]] = []  # (time, pods added)
        self.down_events: list[tuple[int, int]] = []  # (time, pods removed)
        self.phase = "idle"
        # The start: minReplicaCount workers, warm (none on the GPU overlay).
        self.replicas = cfg.min_replicas
        self.pods: list[Pod] = [Pod(created=0, ready_at=0) for _ in range(cfg.min_replicas)]

    # --- workers -------------------------------------------------------------------------------------------
    def live_pods(self) -> list[Pod]:
        return [p for p in self.pods if p.deleted_at is None]

    def in_flight(self) -> int:
        return sum(len(p.jobs) for p in self.pods)

    def _set_replicas(self, new: int, t: int, by: str) -> None:
        old = self.replicas
        if new == old:
            return
        self.run.events.append(ScaleEvent(t, self.phase, by, old, new, self.queued, self.in_flight()))
        self.replicas = new
        live = self.live_pods()
        if new > len(live):
            for _ in range(new - len(live)):
                self.pods.append(Pod(created=t, ready_at=t + STARTUP_S))
        else:
            # The ReplicaSet deletes pods that are not ready first, then the most recently ready.
            order = sorted(live, key=lambda p: (p.ready_at <= t, -p.ready_at, -p.created))
            for pod in order[: len(live) - new]:
                pod.deleted_at = t

    def complete(self, t: int) -> int:
        """Jobs finishing at ``t``, and workers being deleted: gone once drained, or at their deadline
        with the rest handed back to the queue. Returns the number of jobs finished."""
        cfg = self.cfg
        finished = 0
        for pod in self.pods:
            done = [f for f in pod.jobs if f <= t]
            finished += len(done)
            pod.jobs = [f for f in pod.jobs if f > t]
        for pod in list(self.pods):
            if pod.deleted_at is None:
                continue
            sigterm = pod.deleted_at + cfg.prestop_s
            if t >= sigterm and not pod.jobs:
                self.pods.remove(pod)
            elif t >= sigterm + cfg.grace_s:  # the worker's own deadline: hand the rest back
                self.queued += len(pod.jobs)
                self.run.handed_back += len(pod.jobs)
                self.pods.remove(pod)
        return finished

    def dispatch(self, t: int, arrivals: int) -> None:
        """New jobs join the queue; workers with free slots take from it; Prometheus scrapes."""
        cfg = self.cfg
        self.queued += arrivals
        for pod in sorted(self.pods, key=lambda p: p.created):
            if not pod.takes_jobs(t, cfg):
                continue
            take = min(self.queued, cfg.concurrency - len(pod.jobs))
            pod.jobs.extend([t + SERVICE_S] * take)
            self.queued -= take
        if t % cfg.scrape_s == 0:
            exporting = [p for p in self.pods if p.deleted_at is None and t >= p.ready_at]
            self.scraped = float(self.queued + self.in_flight()) if exporting else None

    # --- KEDA ----------------------------------------------------------------------------------------------
    def read(self, trigger: Trigger, t: int) -> Read:
        """One read of a trigger's metric, with KEDA's fallback accounting (pkg/fallback)."""
        cfg = self.cfg
        if trigger.kind == "redis":
            value: float | None = float(self.queued)  # the list's length, from Redis itself
        elif self.prometheus_down:
            value = None
        elif self.scraped is None:
            value = 0.0 if cfg.ignore_null_values else None
        else:
            value = self.scraped
        if value is not None:
            self.failures[trigger.name] = 0
            return Read(value, value > trigger.activation)
        self.failures[trigger.name] += 1
        if cfg.fallback_threshold >= 0 and self.failures[trigger.name] > cfg.fallback_threshold:
            return Read(trigger.target * cfg.fallback_replicas, True, fallback=True)
        if self.phase == "outage":
            self.run.outage_failed_reads += 1
        return Read(None, False)

    def keda_poll(self, t: int) -> None:
        """KEDA's scale loop (scale_scaledobjects.go RequestScale): activation 0 <-> 1 only."""
        cfg = self.cfg
        reads = [self.read(tr, t) for tr in cfg.triggers]
        active = any(r.active for r in reads if r.value is not None)
        error = any(r.value is None for r in reads)
        if active:
            if self.replicas == 0:
                self._set_replicas(max(cfg.min_replicas, 1), t, "keda")
                self.last_active = t
            elif not error:
                self.last_active = t
        elif error and cfg.fallback_threshold >= 0 and cfg.fallback_replicas != 0:
            pass  # waits for the fallback; never scales to zero on an error
        elif error:
            pass
        elif self.replicas > 0 and cfg.min_replicas == 0:
            if self.last_active is None or self.last_active + cfg.cooldown_s < t:
                self._set_replicas(0, t, "keda")
        elif self.replicas < cfg.min_replicas:
            self._set_replicas(cfg.min_replicas, t, "keda")

    # --- HPA -----------------------------------------------------------------------------------------------
    def hpa_sync(self, t: int) -> None:
        cfg = self.cfg
        current = self.replicas
        if current == 0:
            return  # "scaling is disabled since the replica count of the target is zero"
        if current > cfg.max_replicas:
            desired = cfg.max_replicas
        elif current < cfg.hpa_min:
            desired = cfg.hpa_min
        else:
            status_replicas = len(self.live_pods())
            proposals, invalid = [], 0
            for trigger in cfg.triggers:
                r = self.read(trigger, t)
                if r.value is None:
                    invalid += 1
                    continue
                ratio = r.value / (trigger.target * status_replicas) if status_replicas else math.inf
                if abs(1 - ratio) > HPA_TOLERANCE:
                    proposals.append(math.ceil(r.value / trigger.target))
                else:
                    proposals.append(status_replicas)
            if invalid == len(cfg.triggers):
                return
            proposal = max(proposals)
            if invalid and proposal < current:
                return  # a missing metric blocks a scale-down
            desired = self.normalize(current, proposal, t)
        if desired > current:
            self.up_events.append((t, desired - current))
        elif desired < current:
            self.down_events.append((t, current - desired))
        self._set_replicas(desired, t, "hpa")

    def normalize(self, current: int, desired: int, t: int) -> int:
        """Stabilization, then the policies' rate limits, then [min, max] (normalizeDesiredReplicasWithBehaviors)."""
        cfg = self.cfg
        up_recommendation = down_recommendation = desired
        for when, rec in self.recommendations:
            if when > t - cfg.up.window_s:
                up_recommendation = min(up_recommendation, rec)
            if when > t - cfg.down.window_s:
                down_recommendation = max(down_recommendation, rec)
        self.recommendations.append((t, desired))
        recommendation = min(max(current, up_recommendation), down_recommendation)
        if recommendation > current:
            limit = max(self.scale_up_limit(current, t), current)
            return min(recommendation, cfg.max_replicas, limit)
        if recommendation < current:
            limit = min(self.scale_down_limit(current, t), current)
            return max(recommendation, cfg.hpa_min, limit)
        return recommendation

    def _period_start(self, current: int, policy: Policy, t: int) -> int:
        added = sum(n for when, n in self.up_events if when > t - policy.period_s)
        removed = sum(n for when, n in self.down_events if when > t - policy.period_s)
        return current - added + removed

    def scale_up_limit(self, current: int, t: int) -> int:
        rules = self.cfg.up
        if rules.select == "Disabled":
            return current
        proposed = [scale_up_proposal(self._period_start(current, p, t), p) for p in rules.policies]
        return min(proposed) if rules.select == "Min" else max(proposed)

    def scale_down_limit(self, current: int, t: int) -> int:
        rules = self.cfg.down
        if rules.select == "Disabled":
            return current
        proposed = []
        for p in rules.policies:
            start = self._period_start(current, p, t)
            proposed.append(start - p.value if p.kind == "Pods" else int(start * (1 - p.value / 100)))
        return max(proposed) if rules.select == "Min" else min(proposed)

    # --- the trace -----------------------------------------------------------------------------------------
    def simulate(self) -> Run:
        cfg, run = self.cfg, self.run
        t = 0
        phase_end: int | None = None
        while True:
            arrivals = 0
            if self.phase == "idle" and t == BURST_AT_S:
                self.phase, arrivals = "burst", run.burst_jobs
                run.phase_start["burst"] = t
            elif self.phase == "burst" and self.queued == 0 and t > BURST_AT_S:
                self.phase, phase_end = "saturated", t + SATURATED_S
                run.phase_start["saturated"] = t
            elif self.phase == "saturated" and t >= phase_end:
                self.phase, phase_end = "lull", t + LULL_S
                run.phase_start["lull"] = t
            elif self.phase == "lull" and t >= phase_end:
                self.phase, phase_end = "outage", t + OUTAGE_S
                run.phase_start["outage"] = t
                self.prometheus_down = True
            elif self.phase == "outage" and t >= phase_end:
                self.phase, phase_end = "recovery", t + RECOVERY_S
                run.phase_start["recovery"] = t
                self.prometheus_down = False
            elif self.phase == "recovery" and t >= phase_end:
                return run
            finished = self.complete(t)
            if self.phase == "saturated":
                # arrivals = service rate: every finished job is replaced by a new one at once, so the jobs in
                # the system stay at N x K (N: the fleet when the period starts; the first second fills
                # any free slot). With N workers the queue stays at zero and every worker holds K jobs.
                arrivals = finished
                if t == run.phase_start["saturated"]:
                    arrivals += self.replicas * cfg.concurrency - self.in_flight() - self.queued
            elif self.phase in ("outage", "recovery") and t % TRICKLE_EVERY_S == 0:
                arrivals = 1
            self.dispatch(t, arrivals)
            if t % cfg.polling_s == 0:
                self.keda_poll(t)
            if t % HPA_SYNC_S == 0:
                self.hpa_sync(t)
            fallback = any(n > cfg.fallback_threshold >= 0 for n in self.failures.values())
            run.samples.append(Sample(t, self.phase, self.queued, self.in_flight(), self.replicas, fallback))
            t += 1


def scale_up_proposal(start: int, policy: Policy) -> int:
    if policy.kind == "Pods":
        return start + policy.value
    return math.ceil(start * (1 + policy.value / 100))


def burst_size(cfg: Config) -> int:
    """400 jobs, or more where the fleet drains 400 before it has grown to maxReplicaCount: enough to keep
    the backlog above (max - 1) x K while it grows."""
    return max(400, 4 * cfg.max_replicas * cfg.concurrency)


def simulate(objects: list[dict]) -> Run:
    cfg = load_config(objects)
    return Simulation(cfg, burst_size(cfg)).simulate()


# --- the tests ---------------------------------------------------------------------------------------------
KUSTOMIZATIONS = {"base": K8S_BASE, "gpu": K8S_GPU}
_objects: dict[str, list[dict]] = {}
_runs: dict[str, Run] = {}


def rendered(name: str) -> list[dict]:
    if name not in _objects:
        _objects[name] = render_kustomize(KUSTOMIZATIONS[name])
    return _objects[name]


def run_of(name: str) -> Run:
    if name not in _runs:
        _runs[name] = simulate(rendered(name))
    return _runs[name]


@pytest.fixture(params=sorted(KUSTOMIZATIONS))
def run(request) -> Run:
    return run_of(request.param)


def test_config_is_read_from_the_manifests():
    """Both triggers' target per replica is the worker's concurrency K; the GPU overlay scales to zero."""
    base, gpu = (load_config(rendered(n)) for n in ("base", "gpu"))
    for cfg in (base, gpu):
        assert [(t.kind, t.target, t.activation) for t in cfg.triggers] == [
            ("prometheus", cfg.concurrency, 0), ("redis", cfg.concurrency, 0)
        ]  # fmt: skip
        assert cfg.ignore_null_values and cfg.fallback_threshold >= 1 and cfg.fallback_replicas >= 1
    assert (base.min_replicas, gpu.min_replicas) == (1, 0)


def test_saturated_fleet_keeps_its_size(run):
    """N busy workers, K jobs each, nothing queued: the HPA wants exactly N, and no busy worker is removed."""
    cfg = run.cfg
    saturated = run.phase("saturated")
    assert len(saturated) == SATURATED_S
    assert saturated[0].replicas == cfg.max_replicas, "the burst did not grow the fleet to maxReplicaCount"
    assert saturated[0].queued == 0 and saturated[0].in_flight == cfg.max_replicas * cfg.concurrency
    dropped = [s for s in saturated if s.replicas < saturated[0].replicas]
    assert not dropped, (
        f"replicas dropped from {saturated[0].replicas} to {min(s.replicas for s in saturated)} while every "
        f"worker held {cfg.concurrency} jobs and the queue was empty (first at t={dropped[0].t})"
    )
    assert not [e for e in run.events if e.phase == "saturated"]
    # The premise held all period long: the queue at zero, every worker holding K jobs.
    assert all(s.queued == 0 and s.in_flight == s.replicas * cfg.concurrency for s in saturated)


def test_no_scale_down_while_work_does_not_fit(run):
    """Every scale-down, by the HPA or KEDA, happens with nothing queued and with the jobs in flight fitting
    on the replicas that stay; no job is handed back anywhere in the trace."""
    k = run.cfg.concurrency
    downs = [e for e in run.events if e.new < e.old]
    assert downs, "the trace never scales down"
    for e in downs:
        assert e.queued == 0, e
        assert e.in_flight <= k * e.new, e
    assert run.handed_back == 0


def test_burst_reaches_max_replicas_in_expected_time(run):
    """A burst of jobs takes the fleet to maxReplicaCount as fast as the scale-up policy allows: KEDA's
    activation (from zero: up to one pollingInterval), the HPA's first sync after it (up to 15 s), then one
    policy step per periodSeconds."""
    cfg = run.cfg
    periods = {p.period_s for p in cfg.up.policies}
    assert len(periods) == 1, "the expected time below assumes one periodSeconds for all scale-up policies"
    period = periods.pop()
    start = max(cfg.min_replicas, 1)
    steps, replicas = 0, start
    while replicas < cfg.max_replicas:
        proposals = [scale_up_proposal(replicas, p) for p in cfg.up.policies]
        replicas = min(cfg.max_replicas, min(proposals) if cfg.up.select == "Min" else max(proposals))
        steps += 1
    activation = cfg.polling_s if cfg.min_replicas == 0 else 0
    per_step = math.ceil(period / HPA_SYNC_S) * HPA_SYNC_S
    expected_max = activation + HPA_SYNC_S + (steps - 1) * per_step
    burst_at = run.phase_start["burst"]
    reached = next(s.t for s in run.samples if s.t >= burst_at and s.replicas == cfg.max_replicas)
    took = reached - burst_at
    assert (steps - 1) * period <= took <= expected_max, (
        f"{took} s from the burst to {cfg.max_replicas} replicas; the policy allows {(steps - 1) * period}..{expected_max} s"
    )
    if cfg.min_replicas == 0:  # the first worker is woken by the queue alone, within one poll
        first = next(e for e in run.events if e.t >= burst_at and e.old == 0)
        assert first.by == "keda" and first.t - burst_at <= cfg.polling_s


def test_fallback_holds_its_replicas_during_the_outage(run):
    """Prometheus down: failureThreshold reads of the backlog trigger fail in a row; from the next one on,
    KEDA reports fallback.replicas x target, and the HPA holds fallback.replicas until Prometheus is back."""
    cfg = run.cfg
    assert cfg.fallback_threshold >= 0, "the ScaledObject has no fallback"
    outage = run.phase("outage")
    assert len(outage) == OUTAGE_S
    assert run.outage_failed_reads == cfg.fallback_threshold
    first = next(s for s in outage if s.fallback)
    reads_per_s = 1 / cfg.polling_s + 1 / HPA_SYNC_S  # KEDA's loop and the HPA both read
    assert first.t - outage[0].t <= math.ceil((cfg.fallback_threshold + 1) / reads_per_s) + HPA_SYNC_S
    assert all(s.fallback for s in outage if s.t >= first.t)
    held = [s for s in outage if s.replicas == cfg.fallback_replicas]
    assert held, f"replicas never reached fallback.replicas ({cfg.fallback_replicas}) during the outage"
    since = held[0].t
    assert since - first.t <= HPA_SYNC_S + cfg.up.policies[0].period_s, "the fallback took too long to apply"
    after = [s.replicas for s in outage if s.t >= since]
    assert set(after) == {cfg.fallback_replicas}, f"the fallback did not hold: {sorted(set(after))}"
    # The trickle fits on one replica; the queue never backs up during the outage.
    assert max(s.queued for s in outage) <= cfg.concurrency


def test_lull_scales_down_to_min_or_zero(run):
    """The lull: the HPA removes workers after its scale-down stabilization window; the base stays at
    minReplicaCount 1 (cooldownPeriod plays no part); the GPU overlay goes to zero cooldownPeriod after the
    last job left, and its first queued job of the outage wakes a worker again."""
    cfg = run.cfg
    lull = run.phase("lull")
    idle_since = next(s.t for s in lull if s.queued == 0 and s.in_flight == 0)
    first_down = next(e for e in run.events if e.phase == "lull" and e.new < e.old)
    if first_down.by == "hpa":
        # The fleet was full when the lull began: no worker goes before a whole stabilization window
        # (less one scrape and one sync of lag) has passed, so a shorter lull removes nothing.
        assert first_down.t - lull[0].t >= cfg.down.window_s - cfg.scrape_s - HPA_SYNC_S
    assert lull[-1].replicas == cfg.min_replicas
    if cfg.min_replicas == 0:
        to_zero = next(e for e in run.events if e.phase == "lull" and e.new == 0)
        assert to_zero.by == "keda"
        # KEDA's last active poll saw the backlog (at most one scrape old) before it reached zero.
        assert idle_since + cfg.cooldown_s - cfg.scrape_s - cfg.polling_s <= to_zero.t
        assert to_zero.t <= idle_since + cfg.scrape_s + cfg.cooldown_s + 2 * cfg.polling_s
    else:
        assert min(s.replicas for s in run.samples if s.t >= run.phase_start["burst"]) == cfg.min_replicas


def test_the_simulation_fails_a_target_of_twice_the_concurrency():
    """Teeth: the earlier target, 2K per replica (threshold "16" on CPU), halves a saturated fleet."""
    objects = json.loads(json.dumps(rendered("base")))
    scaled = next(o for o in objects if o["kind"] == "ScaledObject")
    k = int(next(o for o in objects if o["kind"] == "ConfigMap" and "TAGSTREAM_CONCURRENCY" in o["data"])["data"]["TAGSTREAM_CONCURRENCY"])
    for trigger in scaled["spec"]["triggers"]:
        key = "threshold" if trigger["type"] == "prometheus" else "listLength"
        trigger["metadata"][key] = str(2 * k)
    broken = simulate(objects)
    saturated = broken.phase("saturated")
    assert min(s.replicas for s in saturated) < saturated[0].replicas
    with pytest.raises(AssertionError, match="replicas dropped"):
        test_saturated_fleet_keeps_its_size(broken)


# --- python tests/test_autoscaling.py ----------------------------------------------------------------------
def summary(run: Run) -> str:
    """The replicas over the trace: every change, with the phase, queue and jobs in flight."""
    lines = [f"burst {run.burst_jobs} jobs; phases start at " + ", ".join(f"{k} {v}s" for k, v in run.phase_start.items())]
    for e in run.events:
        lines.append(f"  t={e.t:5d}s {e.phase:9s} {e.by:4s} {e.old:2d} -> {e.new:2d}  (queued {e.queued}, in flight {e.in_flight})")
    return "\n".join(lines)


if __name__ == "__main__":
    for name in sorted(KUSTOMIZATIONS):
        print(f"== {name}")
        print(summary(run_of(name)))
