"""``tagstream doctor``: the Redis checks against real redis-servers configured well and badly (the command
run as a subprocess), the lock comparison, torchaudio's import failure, the driver and GPU rules, the URI
policy, the model checks and the start-up warnings."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from worker import cpu_budget as cb
from worker.config import Settings
from worker.lockfile import default_lock
from worker.service.doctor import (
    check_checkpoint,
    check_checkpoint_files,
    check_weight_files,
    log_startup_warnings,
    model_checks,
    policy_checks,
    startup_warnings,
)
from worker.service.doctor_checks import LOCK_ENV, check_lock, check_torchaudio, find_lock
from worker.service.doctor_device import (
    DriverInfo,
    cpu_checks,
    device_checks,
    evaluate_driver,
    evaluate_gpu,
    parse_driver_version,
)
from worker.service.doctor_redis import redact_url
from worker.tools.local_redis import free_port, redis_server_binary

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_LOCK = default_lock("runtime")

BAD_REDIS = ("--maxmemory-policy", "allkeys-lru", "--appendonly", "no", "--save", "")
GOOD_REDIS = ("--maxmemory-policy", "noeviction", "--appendonly", "yes")


@contextmanager
def redis_server(data_dir: Path, *config: str) -> Iterator[str]:
    """A private redis-server with ``config`` arguments on a free port; yields its URL."""
    port = free_port()
    args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
            "--daemonize", "no", "--loglevel", "warning", *config]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


def doctor(*args: str) -> subprocess.CompletedProcess:
    """``python -m worker.cli doctor ARGS`` in a clean environment (no TAGSTREAM_* from the caller)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAGSTREAM_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "worker.cli", "doctor", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)  # fmt: skip


def doctor_json(*args: str) -> tuple[int, dict[str, dict], dict]:
    """Exit status, checks by name and the whole document of ``doctor --json --quick ARGS``."""
    out = doctor("--json", "--quick", *args)
    assert out.stdout.strip(), out.stderr
    document = json.loads(out.stdout)
    return out.returncode, {c["name"]: c for c in document["checks"]}, document


# --- Redis, through the command -----------------------------------------------------------------------


@pytest.mark.integration
def test_redis_that_may_evict_and_does_not_persist_is_warned_about(tmp_path):
    with redis_server(tmp_path, *BAD_REDIS) as url:
        code, checks, document = doctor_json("--redis-url", url, "--allowed-roots", str(tmp_path))
    assert checks["redis"]["status"] == "OK"
    assert checks["redis-maxmemory-policy"]["status"] == "WARN"
    assert "allkeys-lru" in checks["redis-maxmemory-policy"]["detail"]
    assert "noeviction" in checks["redis-maxmemory-policy"]["detail"]
    assert checks["redis-persistence"]["status"] == "WARN"
    assert "both off" in checks["redis-persistence"]["detail"]
    # warnings do not fail the command
    assert document["summary"]["fail"] == 0 and document["summary"]["status"] == "WARN" and code == 0


@pytest.mark.integration
def test_well_configured_host_passes(tmp_path):
    data = tmp_path / "redis"
    data.mkdir()
    with redis_server(data, *GOOD_REDIS) as url:
        client = redis.Redis.from_url(url)
        client.rpush("rq:queue:tagging", "tag-v1")
        client.xgroup_create("tagstream:uploads", "tagstream-bridge", id="0", mkstream=True)
        client.xadd("tagstream:uploads", {"video_id": "v2"})
        code, checks, document = doctor_json("--redis-url", url, "--allowed-roots", str(tmp_path))
    failures = [c for c in document["checks"] if c["status"] == "FAIL"]
    assert code == 0 and failures == [], failures
    for name in ("redis", "redis-maxmemory-policy", "redis-persistence", "queue", "intake-stream", "lock",
                 "allowed-uris"):  # fmt: skip
        assert checks[name]["status"] == "OK", checks[name]
    assert "AOF on" in checks["redis-persistence"]["detail"]
    assert "1 job waiting" in checks["queue"]["detail"]
    assert "1 entry" in checks["intake-stream"]["detail"] and "group tagstream-bridge present" in (
        checks["intake-stream"]["detail"])  # fmt: skip
    assert document["summary"]["exit_code"] == 0 and document["summary"]["quick"] is True


@pytest.mark.integration
def test_unreachable_redis_fails_and_hides_the_password(tmp_path):
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    out = doctor("--quick", "--redis-url", url, "--allowed-roots", str(tmp_path))
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(r"^FAIL\s+redis\s+cannot reach redis://:\*\*\*@127\.0\.0\.1", out.stdout, re.M), (
        out.stdout
    )
    assert "hunter2" not in out.stdout
    assert (
        "redis-maxmemory-policy" not in out.stdout
    )  # nothing more is asked of a server that does not answer
    assert out.stdout.rstrip().splitlines()[-1].startswith("FAIL: ")


def test_redact_url():
    assert redact_url("redis://:secret@h:6379/0") == "redis://:***@h:6379/0"
    assert (
        redact_url("rediss://user:secret@h:6380/0?ssl_ca_certs=/ca.pem")
        == "rediss://user:***@h:6380/0?ssl_ca_certs=/ca.pem"
    )
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


@pytest.mark.integration
def test_startup_warnings_name_the_redis_and_policy_problems(tmp_path, caplog):
    with redis_server(tmp_path, *BAD_REDIS) as url:
        settings = Settings(redis_url=url, device="cpu")
        messages = log_startup_warnings(settings, redis.Redis.from_url(url))
    assert any(m.startswith("WARN redis-maxmemory-policy: allkeys-lru") for m in messages), messages
    assert any(m.startswith("WARN redis-persistence:") for m in messages), messages
    assert any(m.startswith("FAIL allowed-uris:") for m in messages), messages
    assert sum("doctor: " in r.getMessage() for r in caplog.records) == len(messages)

    data = tmp_path / "good"
    data.mkdir()
    with redis_server(data, *GOOD_REDIS) as url:
        settings = Settings(redis_url=url, device="cpu", allowed_roots=[str(tmp_path)])
        messages = startup_warnings(settings, redis.Redis.from_url(url))
    assert not [m for m in messages if "redis" in m or "allowed-uris" in m], messages


# --- the lock -----------------------------------------------------------------------------------------


def changed_lock(tmp_path: Path, name: str, version: str) -> Path:
    text, n = re.subn(rf"^{name}==[^\s\\]+", f"{name}=={version}", RUNTIME_LOCK.read_text(), flags=re.M)
    assert n == 1
    path = tmp_path / "lock.txt"
    path.write_text(text)
    return path


def test_the_real_lock_passes():
    check = check_lock(RUNTIME_LOCK, "checkout")
    assert check.status == "OK", check.detail


def test_a_changed_pin_fails_naming_the_distribution(tmp_path):
    check = check_lock(changed_lock(tmp_path, "rq", "0.0.1"), "--lock")
    assert check.status == "FAIL"
    assert "rq " in check.detail and "(locked 0.0.1)" in check.detail and "1 of " in check.detail


@pytest.mark.integration
def test_lock_option_of_the_command(tmp_path):
    code, checks, _ = doctor_json("--lock", str(changed_lock(tmp_path, "rq", "0.0.1")),
                                  "--redis-url", f"redis://127.0.0.1:{free_port()}/0")  # fmt: skip
    assert code == 1 and checks["lock"]["status"] == "FAIL" and "rq " in checks["lock"]["detail"]


def test_which_lock(tmp_path):
    assert find_lock("x.txt", {LOCK_ENV: "y.txt"}) == (Path("x.txt"), "--lock")
    assert find_lock(None, {LOCK_ENV: "y.txt"}) == (Path("y.txt"), LOCK_ENV)
    assert find_lock(None, {}) == (RUNTIME_LOCK, "checkout")
    assert check_lock(tmp_path / "absent.txt", LOCK_ENV).status == "FAIL"
    assert check_lock(None, "none").status == "WARN"


# --- torchaudio, driver and GPUs ----------------------------------------------------------------------


def test_torchaudio_built_for_another_torch_fails():
    def broken(name):
        raise OSError("/venv/torchaudio/lib/libtorchaudio.so: undefined symbol: _ZN3c104cuda9SetDeviceEa")

    check = check_torchaudio(import_module=broken)
    assert check.status == "FAIL" and "undefined symbol: _ZN3c104cuda9SetDeviceEa" in check.detail

    class OtherRelease:
        __version__ = "2.10.0"

    check = check_torchaudio(import_module=lambda name: OtherRelease)
    assert check.status == "FAIL" and "2.10.0" in check.detail
    assert check_torchaudio().status == "OK"


def test_driver_version_file_is_parsed():
    proprietary = (
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.133.20  Fri Mar 14 2025\nGCC version:  gcc 12"
    )
    open_module = (
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U16)"
    )
    assert parse_driver_version(proprietary) == "570.133.20"
    assert parse_driver_version(open_module) == "580.65.06"
    assert parse_driver_version("garbage") is None


def test_driver_rules_for_the_cuda_13_build():
    r570, r580 = DriverInfo("570.133.20", 570, None, "proc"), DriverInfo("580.65.06", 580, 13000, "proc")
    assert evaluate_driver("13.0", r570, "auto").status == "FAIL"
    assert "R580" in evaluate_driver("13.0", r570, "auto").detail
    assert evaluate_driver("13.0", r570, "cpu").status == "WARN"
    assert evaluate_driver("13.0", r580, "auto").status == "OK"
    assert evaluate_driver("13.0", DriverInfo(None, None, 12080, "libcuda"), "cuda").status == "FAIL"
    assert evaluate_driver("13.0", DriverInfo(None, None, 13000, "libcuda"), "cuda").status == "OK"
    assert evaluate_driver("12.8", r570, "auto").status == "OK"
    assert evaluate_driver("13.0", DriverInfo(), "auto").status == "OK"  # no driver: CPU mode
    assert evaluate_driver(None, r570, "auto").status == "OK"  # a CPU build of torch


def test_volta_is_not_supported_by_the_cuda_13_build():
    v100 = evaluate_gpu(0, "Tesla V100-SXM2-32GB", (7, 0), 32 * 2**30, "13.0", "auto")
    assert v100.status == "FAIL" and v100.name == "gpu:0" and "7.0" in v100.detail
    assert evaluate_gpu(1, "Tesla T4", (7, 5), 16 * 2**30, "13.0", "auto").status == "OK"
    assert evaluate_gpu(0, "NVIDIA H200", (9, 0), 141 * 2**30, "13.0", "auto").status == "OK"
    assert evaluate_gpu(0, "Tesla V100", (7, 0), 32 * 2**30, "12.8", "auto").status == "OK"


def test_no_gpu_is_cpu_mode_unless_cuda_is_configured():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    checks = {c.name: c for c in device_checks(Settings(device="auto"))}
    assert checks["device"].status == "OK" and "CPU" in checks["device"].detail
    assert device_checks(Settings(device="cuda"))[0].status == "FAIL"


# --- URI policy, models, CPU budget -------------------------------------------------------------------


def test_uri_policy(tmp_path):
    empty = policy_checks(Settings())[0]
    assert empty.status == "FAIL" and "both empty" in empty.detail and "forbidden_uri" in empty.detail
    assert policy_checks(Settings(allowed_roots=[str(tmp_path)]))[0].status == "OK"
    assert policy_checks(Settings(allowed_hosts=["media.example.com"]))[0].status == "OK"
    assert (
        policy_checks(Settings(allowed_roots=[str(tmp_path)], allowed_schemes=["https"]))[0].status == "FAIL"
    )
    assert policy_checks(Settings(allowed_roots=[str(tmp_path / "absent")]))[0].status == "WARN"
    inside = policy_checks(
        Settings(allowed_roots=[str(tmp_path)], uri_template=f"{tmp_path}/{{video_id}}.mp4")
    )
    assert [c.status for c in inside] == ["OK", "OK"]
    outside = policy_checks(Settings(allowed_roots=[str(tmp_path)], uri_template="/etc/{video_id}.mp4"))
    assert outside[1].name == "uri-template" and outside[1].status == "FAIL"


def test_model_files(tmp_path):
    assert check_weight_files(Settings()).status == "OK"
    assert check_weight_files(Settings(image_arch="resnet50")).status == "FAIL"
    missing = check_weight_files(Settings(vggish_weights=tmp_path / "vggish.pth"))
    assert missing.status == "FAIL" and "vggish.pth" in missing.detail
    assert check_checkpoint_files(Settings()).status == "OK"
    assert check_checkpoint_files(Settings(checkpoint=tmp_path / "absent")).status == "FAIL"


@pytest.fixture(scope="module")
def built(one_torch_thread):
    """The default extractors, built once, and the model checks of the default settings."""
    from worker.engine.models import load_extractors

    return load_extractors(Settings(device="cpu")), {c.name: c for c in model_checks(Settings(device="cpu"))}


@pytest.mark.slow
def test_models_build_and_the_text_encoder_runs(built):
    _, checks = built
    assert [checks[n].status for n in ("weights", "extractors", "text-encoder", "checkpoint")] == ["OK"] * 4
    assert "forward pass" in checks["text-encoder"].detail
    assert "compatible" in checks["checkpoint"].detail


@pytest.mark.slow
def test_checkpoint_of_other_extractors_fails(built, tmp_path):
    from worker.engine.models import default_checkpoint_dir

    ckpt = tmp_path / "ckpt"
    shutil.copytree(default_checkpoint_dir(), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["extractors"]["image"]["id"] = "resnet50.0123456789ab"
    (ckpt / "config.json").write_text(json.dumps(config))
    check = check_checkpoint(Settings(device="cpu", checkpoint=ckpt), built[0])
    assert (
        check.status == "FAIL"
        and "resnet50.0123456789ab" in check.detail
        and "efficientnet_lite0" in check.detail
    )


def test_cpu_budget_and_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    (tmp_path / "cgroup").mkdir()
    (tmp_path / "cgroup" / "cgroup.controllers").write_text("cpu\n")
    (tmp_path / "cgroup" / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "proc-cgroup").write_text("0::/\n")
    monkeypatch.setattr(cb, "PROC_CGROUP", tmp_path / "proc-cgroup")
    monkeypatch.setattr(cb, "CGROUP_ROOT", tmp_path / "cgroup")
    budget, threads = cpu_checks(Settings(device="cpu"))
    assert budget.status == "OK" and budget.detail.startswith("2 CPU(s), limited by cgroup quota (node 64")
    assert threads.status == "OK" and threads.detail.startswith("decode 2, inference 2 on cpu")
    _, threads = cpu_checks(Settings(device="cpu", decode_threads=16))
    assert threads.status == "WARN" and "decode_threads=16" in threads.detail


def test_invalid_settings_are_a_failure_not_a_traceback(capsys, monkeypatch):
    from worker.cli import main

    monkeypatch.delenv(LOCK_ENV, raising=False)
    assert main(["doctor", "--json", "--decode-threads", "many"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["checks"][0]["name"] == "settings" and document["checks"][0]["status"] == "FAIL"
