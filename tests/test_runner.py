"""``tagstream worker --gpus`` / ``--workers-per-gpu``: the supervisor, with real ``tagstream worker`` children.

There is no GPU here, so the tests name the devices (``--gpus 0,1``) and pass ``--device cpu``: each
child still gets its own ``CUDA_VISIBLE_DEVICES`` and metrics port, loads the real models on CPU and
registers with rq; ``--workers-per-gpu 2`` without ``--gpus`` runs two CPU workers. Children are found
through ``/proc`` (Linux), their environment read from ``/proc/PID/environ``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from rq import Worker
from worker_support import ROOT, http_get, scrape, wait_for

from worker.config import CPU_SHARE_ENV, Settings, settings_from_args
from worker.cpu_budget import cpu_budget
from worker.jobs.enqueue import tag_queue
from worker.service.run import add_arguments
from worker.service.supervisor import (
    ChildSpec,
    Supervisor,
    child_flags,
    child_specs,
    devices_for,
    share_cpu_budget,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid`` (zombies excluded)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            out.append(int(entry.name))
    return sorted(out)


def environ_of(pid: int) -> dict[str, str]:
    """The environment ``pid`` started with ({} when it has gone)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def cmdline_of(pid: int) -> list[str]:
    return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]


def flag_value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def free_port_pair() -> int:
    """A port P with P and P+1 both free."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def start_supervisor(redis_url: str, port: int, log: Path, *extra: str, gpus: tuple[str, ...] = ("--gpus", "0,1"),
                     ) -> subprocess.Popen:  # fmt: skip
    cmd = [sys.executable, "-m", "worker.cli", "worker", *gpus, "--device", "cpu", "--hwaccel", "none",
           "--redis-url", redis_url, "--queue", "supervised", "--name", "sup", "--no-bridge",
           "--metrics-host", "127.0.0.1", "--metrics-port", str(port), "--heartbeat-interval-s", "0.5", *extra]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))


def child_by_device(sup: subprocess.Popen) -> dict[str, int]:
    found = {pid: environ_of(pid) for pid in children_of(sup.pid)}
    return {env["CUDA_VISIBLE_DEVICES"]: pid for pid, env in found.items() if "CUDA_VISIBLE_DEVICES" in env}


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_devices_for_each_gpus_form(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert devices_for("all") == ["2", "3"]  # the visible ids themselves, not 0..n-1
    assert devices_for("1") == ["2"]
    with pytest.raises(SystemExit):
        devices_for("3")
    assert devices_for("0,5") == ["0", "5"]  # explicit ids pass through unchecked
    assert devices_for("GPU-8a1b,GPU-77ff") == ["GPU-8a1b", "GPU-77ff"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devices_for("all") == [None]  # no GPU: one worker without a device


def test_child_flags_pass_settings_through_but_not_per_child_ones():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--gpus", "all", "--name", "w", "--metrics-port", "9200", "--concurrency", "3",
                              "--burst", "--allowed-roots", "/a,/b", "--no-bridge"])  # fmt: skip
    flags = child_flags(args)
    assert flags == ["--concurrency", "3", "--burst", "--allowed-roots", "/a,/b", "--no-bridge"]
    again = parser.parse_args(flags)
    assert again.gpus is None and again.no_bridge
    from worker.config import settings_from_args

    assert settings_from_args(again).allowed_roots == ["/a", "/b"]


def parse_worker_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_child_specs_two_devices_three_workers_each():
    """Child i = position * N + j: devices in order, N consecutive children each, port and name by i."""
    specs = child_specs(["GPU-a", "5"], 3, 9200, "node7")
    assert [(s.index, s.device, s.metrics_port, s.name) for s in specs] == [
        (0, "GPU-a", 9200, "node7-0"), (1, "GPU-a", 9201, "node7-1"), (2, "GPU-a", 9202, "node7-2"),
        (3, "5", 9203, "node7-3"), (4, "5", 9204, "node7-4"), (5, "5", 9205, "node7-5"),
    ]  # fmt: skip
    assert [(s.metrics_port, s.name) for s in child_specs(["0", "1"], 3, 0, None)] == [(0, None)] * 6
    assert child_specs([None], 2, 9108, None) == [ChildSpec(0, None, 9108, None), ChildSpec(1, None, 9109, None)]


def test_each_childs_command_and_environment(monkeypatch):
    """What a child is started with: its device, port and name, one worker per process (even when
    TAGSTREAM_WORKERS_PER_GPU says otherwise), its CPU share, the flags passed through; a restart renames
    it."""
    monkeypatch.setenv("TAGSTREAM_WORKERS_PER_GPU", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    args = parse_worker_args(["--gpus", "all", "--name", "n", "--metrics-port", "9300", "--concurrency", "4"])
    settings = settings_from_args(args)
    specs = child_specs(devices_for(args.gpus), settings.workers_per_gpu, settings.metrics_port, args.name)
    sup = Supervisor(child_flags(args), specs, settings, share_cpu_budget(len(specs), 12))
    seen = []
    for child in sup.children:
        cmd, env = sup.command(child)
        assert cmd[1:4] == ["-m", "worker.cli", "worker"]
        child_args = parse_worker_args(cmd[4:])
        monkeypatch.setenv(CPU_SHARE_ENV, env[CPU_SHARE_ENV])
        child_settings = settings_from_args(child_args)  # under the child's environment, as the child reads it
        assert child_args.gpus is None and child_settings.workers_per_gpu == 1  # a worker, not a supervisor
        assert child_settings.concurrency == 4 and child_settings.resolved_decode_threads() == 2  # 12 // 6
        seen.append((env["CUDA_VISIBLE_DEVICES"], child_settings.metrics_port, child_args.name))
    assert seen == [("0", 9300, "n-0"), ("0", 9301, "n-1"), ("0", 9302, "n-2"),
                    ("1", 9303, "n-3"), ("1", 9304, "n-4"), ("1", 9305, "n-5")]  # fmt: skip
    sup.children[4].restarts = 2
    cmd, _ = sup.command(sup.children[4])
    assert flag_value(cmd, "--name") == "n-4.2" and flag_value(cmd, "--metrics-port") == "9304"


def test_the_cpu_budget_is_shared_not_multiplied(monkeypatch):
    """Each child's share is budget // children, at least 1; in a child it replaces the whole budget for
    decode threads 0 and CPU inference threads 0 (a GPU's 1 inference thread and explicit counts stay)."""
    assert share_cpu_budget(8, 16).cpus == 2  # --gpus all on an 8-GPU, 16-core box: not 8 x 16 decoders
    assert share_cpu_budget(6, 16).cpus == 2  # 2 GPUs x 3 workers
    assert share_cpu_budget(2, 7).cpus == 3
    assert share_cpu_budget(32, 16).cpus == 1
    assert share_cpu_budget(1, 16).cpus == 16
    monkeypatch.delenv(CPU_SHARE_ENV, raising=False)
    assert Settings().resolved_cpu_budget() == cpu_budget().cpus  # not supervised: the process's own
    monkeypatch.setenv(CPU_SHARE_ENV, "3")
    auto = Settings()
    assert auto.resolved_cpu_budget() == 3
    assert auto.resolved_decode_threads() == 3 and auto.resolved_inference_threads("cpu") == 3
    assert auto.resolved_inference_threads("cuda") == 1
    explicit = Settings(decode_threads=6, inference_threads=5)
    assert explicit.resolved_decode_threads() == 6 and explicit.resolved_inference_threads("cpu") == 5


def test_workers_per_gpu_without_gpus_runs_that_many_cpu_workers(redis_url, tmp_path):
    """``--workers-per-gpu 2`` and no GPU: two real workers, each with its own rq name and metrics port that
    a Prometheus scrape reads, each with its share of the CPU budget (as many decoder processes); SIGTERM
    stops both."""
    port = free_port_pair()
    conn = redis.Redis.from_url(redis_url)
    queue = tag_queue(conn, Settings(queue="supervised"))
    budget = cpu_budget().cpus  # the children inherit this process's affinity and cgroup
    share = max(1, budget // 2)
    sup = start_supervisor(redis_url, port, tmp_path / "supervisor.log", gpus=("--workers-per-gpu", "2"))
    try:
        wait_for(lambda: len(children_of(sup.pid)) == 2, 60, "two children", sup)
        by_name = {flag_value(cmdline_of(pid), "--name"): pid for pid in children_of(sup.pid)}
        assert sorted(by_name) == ["sup-0", "sup-1"]
        for i in (0, 1):
            cmd, env = cmdline_of(by_name[f"sup-{i}"]), environ_of(by_name[f"sup-{i}"])
            assert flag_value(cmd, "--metrics-port") == str(port + i)
            assert flag_value(cmd, "--workers-per-gpu") == "1" and "--gpus" not in cmd
            assert env[CPU_SHARE_ENV] == str(share) and env["CUDA_VISIBLE_DEVICES"] == ""  # no device: inherited
        wait_for(lambda: sorted(w.name for w in Worker.all(queue=queue)) == ["sup-0", "sup-1"], 240,
                 "both children registered with rq", sup)  # fmt: skip
        for i in (0, 1):
            wait_for(lambda p=port + i: scrape(p).get(("tagstream_ready", ())) == 1.0, 60, f"ready on {port + i}", sup)
            assert scrape(port + i)[("tagstream_in_flight_videos", ())] == 0.0
            decoders = [p for p in children_of(by_name[f"sup-{i}"]) if "worker.media.decoder_child" in cmdline_of(p)]
            assert len(decoders) == share  # decode_threads 0: the share, not the whole budget
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0
        assert Worker.all(queue=queue) == []
    finally:
        for pid in children_of(sup.pid):
            os.kill(pid, signal.SIGKILL)
        stop(sup)
    log = (tmp_path / "supervisor.log").read_text()
    assert f"CPU budget of {budget} split between 2 workers: {share} each" in log


def test_supervisor_workers_per_device_restart_and_sigterm(redis_url, tmp_path):
    """One worker per device (own CUDA_VISIBLE_DEVICES, metrics port, rq name); a SIGKILLed child is
    restarted on the same device and port; SIGTERM reaches every child, which stop cleanly."""
    port = free_port_pair()
    conn = redis.Redis.from_url(redis_url)
    queue = tag_queue(conn, Settings(queue="supervised"))
    sup = start_supervisor(redis_url, port, tmp_path / "supervisor.log")
    try:
        wait_for(lambda: sorted(child_by_device(sup)) == ["0", "1"], 60, "one child per device", sup)
        first = child_by_device(sup)
        for device, pid in first.items():
            cmd = cmdline_of(pid)
            assert cmd[1:4] == ["-m", "worker.cli", "worker"] and "--gpus" not in cmd
            assert flag_value(cmd, "--metrics-port") == str(port + int(device))
            assert flag_value(cmd, "--name") == f"sup-{device}"
            assert flag_value(cmd, "--device") == "cpu"
            assert os.getsid(pid) == pid  # own session: a terminal's Ctrl-C reaches the supervisor only
        for offset in (0, 1):  # each child serves its own health endpoint (it answers while models load)
            wait_for(lambda o=offset: http_get(f"http://127.0.0.1:{port + o}/healthz")[0] == 200, 60,
                     f"/healthz on port {port + offset}", sup)  # fmt: skip

        os.kill(first["1"], signal.SIGKILL)  # a crash (OOM killer, segfault) of the worker on device 1
        wait_for(lambda: child_by_device(sup).get("1") not in (None, first["1"]), 30, "device 1 restarted", sup)
        restarted = child_by_device(sup)
        assert restarted["0"] == first["0"]  # the other worker is left alone
        cmd = cmdline_of(restarted["1"])
        assert flag_value(cmd, "--metrics-port") == str(port + 1) and flag_value(cmd, "--name") == "sup-1.1"

        # both load their models and register with rq under their own names
        wait_for(lambda: sorted(w.name for w in Worker.all(queue=queue)) == ["sup-0", "sup-1.1"], 240,
                 "both children registered with rq", sup)  # fmt: skip
        for offset in (0, 1):
            wait_for(lambda o=offset: http_get(f"http://127.0.0.1:{port + o}/readyz")[0] == 200, 60,
                     f"/readyz on port {port + offset}", sup)  # fmt: skip

        sup.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0
        assert children_of(sup.pid) == []
        assert Worker.all(queue=queue) == []  # every child stopped cleanly and unregistered
    finally:
        for pid in children_of(sup.pid):
            os.kill(pid, signal.SIGKILL)
        stop(sup)
    log = (tmp_path / "supervisor.log").read_text()
    assert "worker 1 (pid" in log and "restarting" in log


def test_sigterm_while_children_load_exits_cleanly(redis_url, tmp_path):
    """SIGTERM to the supervisor before its children finished loading: every child ends at once (killed
    by the forwarded SIGTERM: nothing was in flight) and the supervisor exits with status 0."""
    port = free_port_pair()
    sup = start_supervisor(redis_url, port, tmp_path / "supervisor.log")
    try:
        for offset in (0, 1):
            wait_for(lambda o=offset: http_get(f"http://127.0.0.1:{port + o}/healthz")[0] == 200, 60,
                     f"/healthz on port {port + offset}", sup)  # fmt: skip
        children = children_of(sup.pid)
        assert len(children) == 2
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(30) == 0
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    finally:
        for pid in children_of(sup.pid):
            os.kill(pid, signal.SIGKILL)
        stop(sup)


EARLY_STOP_CHILD = """
import sys, threading
from worker.service.run import EarlyStop
early = EarlyStop()
early.loading() if sys.argv[1] == "loading" else early.loaded()
print("ready", flush=True)
if sys.argv[1] == "loading":
    sum(range(10**13))  # one long C call that never looks at pending signals (like a slow import)
else:
    print("requested" if early.requested.wait(30) else "not requested", flush=True)
"""


@pytest.mark.parametrize("phase", ["loading", "loaded"])
def test_early_stop_during_and_after_loading(phase):
    """While models load, SIGTERM ends the worker at once even when its main thread is inside one long C
    call, where a Python handler would never run; once loaded, SIGTERM is only recorded (the worker then
    returns 0 before taking work)."""
    proc = subprocess.Popen([sys.executable, "-c", EARLY_STOP_CHILD, phase], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
    finally:
        proc.kill()
    if phase == "loading":
        assert code == -signal.SIGTERM
    else:
        assert code == 0 and proc.stdout.read().strip() == "requested"
