"""``tagstream doctor``: check this host before it runs workers, one line per check.

Output: one line per check, ``OK``/``WARN``/``FAIL``, the check's name and a detail, then a summary line;
``--json`` prints the same as one document ``{"checks": [{"name", "status", "detail"}, ...], "summary":
{"status", "ok", "warn", "fail", "exit_code", "quick"}}``. Exit status 1 when any check FAILs (something
that blocks work), else 0: warnings do not fail.

Checks, in order: versions (Python, torch, torchaudio, torchvision, PyAV and FFmpeg, rq, redis-py,
transformers) and the lock (:mod:`worker.service.doctor_checks`); the device, driver, GPUs, NVDEC and the
CPU budget (:mod:`worker.service.doctor_device`); Redis
(:mod:`worker.service.doctor_redis`); the URI policy; model files, then (without ``--quick``) the extractors built
as the worker builds them, one text-encoder forward pass on a title and the checkpoint loaded with the
worker's own compatibility check; the CPU budget and the thread counts the worker will use.

Interpretations:

* ``allowed_roots`` and ``allowed_hosts`` both empty is FAIL, not WARN: every job then fails with
  ``forbidden_uri``, which is permanent (not retried), so a worker started that way turns the whole queue
  into failures. The same holds when ``allowed_schemes`` leaves neither list usable, and for a
  ``uri_template`` the policy refuses (every job without a uri fails). An allowed root that is not a
  directory here is WARN (jobs under it fail with ``not_found``).
* A configured weights file, encoder directory or checkpoint that is missing, or a checkpoint trained on
  other extractors, is FAIL (the worker refuses to start). No checkpoint at all is WARN: the worker runs
  features-only and results carry no tags.
* ``--quick`` skips what loads models or opens a CUDA decoder; their lines say "not run (--quick)".
* A check that raises unexpectedly becomes a WARN "could not check" line: doctor's own bug must not
  pass for a host problem, nor hide the other checks.

:func:`startup_warnings` runs the cheap subset (Redis policy and persistence, URI policy, CPU budget,
device and driver) for a worker to log at start-up, without loading models.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from pydantic import ValidationError

from worker.config import Settings, add_settings_arguments, settings_from_args
from worker.errors import ForbiddenUriError, NotFoundError
from worker.media.uri_policy import UriPolicy
from worker.service.doctor_checks import (
    Check,
    check_lock,
    error_text,
    fail,
    find_lock,
    ok,
    plural,
    version_checks,
    warn,
)
from worker.service.doctor_device import check_nvdec, cpu_checks, device_checks
from worker.service.doctor_redis import redis_checks

log = logging.getLogger(__name__)

SETTINGS = [
    "redis_url", "queue", "allowed_roots", "allowed_hosts", "allowed_schemes", "uri_template", "device",
    "hwaccel", "checkpoint", "image_arch", "image_weights", "vggish_weights", "vggish_pca", "text_encoder_dir",
    "decode_threads", "inference_threads", "log_level",
]  # fmt: skip
TITLE = "周末骑行 a weekend bike ride"
NOT_RUN = "not run (--quick)"


# --- URI policy ---------------------------------------------------------------------------------------


def policy_checks(settings: Settings) -> list[Check]:
    """``allowed-uris`` and, when a template is configured, ``uri-template`` (see the module docstring)."""
    checks = [check_allowed_uris(settings)]
    if settings.uri_template:
        checks.append(check_uri_template(settings))
    return checks


def check_allowed_uris(settings: Settings) -> Check:
    schemes = sorted({s.lower() for s in settings.allowed_schemes})
    roots, hosts = list(settings.allowed_roots), [h.lower() for h in settings.allowed_hosts]
    detail = f"roots {roots or 'none'}, hosts {hosts or 'none'}, schemes {schemes or 'none'}"
    if not roots and not hosts:
        why = "allowed_roots and allowed_hosts are both empty"
        return fail("allowed-uris", f"{why}: every job will fail with forbidden_uri (set TAGSTREAM_ALLOWED_ROOTS "
                    "and/or TAGSTREAM_ALLOWED_HOSTS)")  # fmt: skip
    local = bool(roots) and "file" in schemes
    remote = bool(hosts) and bool({"http", "https"} & set(schemes))
    if not local and not remote:
        why = "the schemes leave nothing usable (roots need 'file', hosts 'http' or 'https')"
        return fail("allowed-uris", f"{detail}: {why}: every job will fail with forbidden_uri")
    missing = [r for r in roots if not Path(r).is_dir()]
    if missing:
        return warn(
            "allowed-uris", f"{detail}; not a directory here: {missing} (jobs there fail with not_found)"
        )
    return ok("allowed-uris", detail)


def check_uri_template(settings: Settings) -> Check:
    """The template filled with a sample id must pass the URI policy (a missing file is fine)."""
    try:
        uri = settings.uri_template.format(video_id="doctor-sample")
    except (KeyError, IndexError, ValueError) as exc:
        return fail("uri-template", f"{settings.uri_template!r} is not a valid template: {error_text(exc)}")
    try:
        UriPolicy.from_settings(settings).check(uri)
    except NotFoundError:
        pass
    except ForbiddenUriError as exc:
        return fail(
            "uri-template",
            f"{settings.uri_template!r} gives {uri!r}, which the URI policy refuses "
            f"({exc}): every job without a uri will fail with forbidden_uri",
        )
    return ok("uri-template", f"{settings.uri_template!r} passes the URI policy")


# --- model files and models ---------------------------------------------------------------------------


def check_weight_files(settings: Settings) -> Check:
    """Every configured weights file / encoder directory exists; an arch that needs weights has them."""
    problems: list[str] = []
    found: list[str] = []
    for name in ("image_weights", "vggish_weights", "vggish_pca", "text_encoder_dir"):
        value = getattr(settings, name)
        if value is None:
            continue
        path = Path(value).expanduser()
        exists = path.is_dir() if name == "text_encoder_dir" else path.is_file()
        (found if exists else problems).append(
            f"{name} {str(path)!r}" + ("" if exists else " does not exist")
        )
    if settings.image_arch != "efficientnet_lite0" and settings.image_weights is None:
        problems.append(f"image_arch {settings.image_arch} needs image_weights")
    if settings.vggish_pca is not None and settings.vggish_weights is None:
        problems.append("vggish_pca is set without vggish_weights")
    if problems:
        return fail("weights", "; ".join(problems))
    return ok(
        "weights",
        f"image_arch {settings.image_arch}; "
        + (", ".join(found) if found else "no weight files configured: the packaged defaults"),
    )


def check_checkpoint_files(settings: Settings, unchecked: str = NOT_RUN) -> Check:
    """``checkpoint`` without loading anything: the directory the worker would load, and its version;
    ``unchecked`` says why compatibility was not checked."""
    # The engine and the model package are imported inside the checks that use them: they import torch,
    # and a torch that does not import must be a FAIL line of the report, not a crash of doctor.
    from worker.engine.models import resolve_checkpoint

    try:
        path = resolve_checkpoint(settings)
    except FileNotFoundError as exc:
        return fail("checkpoint", str(exc))
    if path is None:
        return warn(
            "checkpoint", "no fusion checkpoint: the worker runs features-only (results carry no tags)"
        )
    config = path / "config.json"
    if not config.is_file():
        return fail("checkpoint", f"{path} is not a checkpoint directory (no config.json)")
    try:
        version = json.loads(config.read_text("utf-8")).get("version", "?")
    except (OSError, ValueError) as exc:
        return fail("checkpoint", f"{config} does not read: {error_text(exc)}")
    return ok("checkpoint", f"{path} (version {version}); compatibility with the extractors {unchecked}")


def check_text_encoder(settings: Settings, encoder: Any = None) -> Check:
    """One forward pass on :data:`TITLE`; builds the encoder from the settings unless one is given."""
    try:
        if encoder is None:
            from model.text import build_text_encoder  # imports torch: see check_checkpoint_files

            encoder = build_text_encoder(settings.text_encoder_dir, device=settings.device)
        start = time.perf_counter()
        states, mask = encoder([TITLE])
        took = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - an undefined symbol from torchaudio lands here too
        return fail("text-encoder", f"does not run: {error_text(exc)}")
    if not bool(mask.any()) or not math.isfinite(float(states.float().abs().sum())):
        return fail(
            "text-encoder", f"{encoder.extractor_id}: forward pass gave an empty mask or non-finite states"
        )
    return ok(
        "text-encoder",
        f"{encoder.extractor_id} on {encoder.device}: forward pass on a title, states "
        f"{tuple(states.shape)} in {took * 1000:.0f} ms",
    )


def check_checkpoint(settings: Settings, extractors: Any) -> Check:
    """``checkpoint`` loaded as the worker loads it (:func:`worker.engine.models.load_models`), which compares the
    checkpoint's extractor ids with ``extractors`` and raises on a mismatch."""
    from worker.engine.models import load_models  # imports torch: see check_checkpoint_files

    try:
        loaded = load_models(settings, extractors=extractors)
    except Exception as exc:  # noqa: BLE001 - CheckpointMismatchError, FileNotFoundError, a corrupt file...
        return fail("checkpoint", f"does not load with the configured extractors: {error_text(exc)}")
    if loaded.tagger is None:
        return warn(
            "checkpoint", "no fusion checkpoint: the worker runs features-only (results carry no tags)"
        )
    return ok(
        "checkpoint",
        f"{loaded.checkpoint_dir}: model {loaded.model_version}, compatible with the configured extractors",
    )


def model_checks(settings: Settings, quick: bool = False) -> list[Check]:
    """``weights``, then ``extractors``, ``text-encoder`` and ``checkpoint`` (cheap forms with ``quick``)."""
    checks = [check_weight_files(settings)]
    if quick:
        return checks + [
            ok("extractors", NOT_RUN),
            ok("text-encoder", NOT_RUN),
            check_checkpoint_files(settings),
        ]
    from worker.engine.models import load_extractors  # imports torch: see check_checkpoint_files

    start = time.perf_counter()
    try:
        extractors = load_extractors(settings)
    except Exception as exc:  # noqa: BLE001
        checks.append(fail("extractors", f"do not build: {error_text(exc)}"))
        unchecked = "not checked: the extractors do not build"
        return checks + [check_text_encoder(settings), check_checkpoint_files(settings, unchecked)]
    ids = extractors.ids()
    checks.append(
        ok(
            "extractors",
            f"image {ids['image']['id']}, audio {ids['audio']['id']}, text "
            f"{ids['text']['id']} on {extractors.device} ({time.perf_counter() - start:.1f} s)",
        )
    )
    return checks + [check_text_encoder(settings, extractors.text), check_checkpoint(settings, extractors)]


# --- running and reporting ----------------------------------------------------------------------------


def guarded(name: str, check: Callable[..., Check | list[Check]], *args: Any, **kwargs: Any) -> list[Check]:
    """``check(*args, **kwargs)`` as a list; an unexpected exception becomes one WARN line."""
    try:
        result = check(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - see the module docstring
        log.debug("check %s raised", name, exc_info=True)
        return [warn(name, f"could not check: {error_text(exc)}")]
    return list(result) if isinstance(result, list) else [result]


def run_checks(
    settings: Settings,
    *,
    lock: str | Path | None = None,
    quick: bool = False,
    connection: redis.Redis | None = None,
) -> list[Check]:
    """Every check, in report order (see the module docstring)."""
    checks = guarded("versions", version_checks)
    checks += guarded("lock", lambda: check_lock(*find_lock(lock)))
    checks += guarded("device", device_checks, settings)
    checks += guarded("nvdec", check_nvdec, settings, probe_device=not quick)
    checks += guarded("redis", redis_checks, settings, connection)
    checks += guarded("allowed-uris", policy_checks, settings)
    checks += guarded("models", model_checks, settings, quick)
    checks += guarded("cpu-budget", cpu_checks, settings)
    return checks


def summarize(checks: list[Check], quick: bool = False) -> dict[str, Any]:
    counts = {status: sum(c.status == status for c in checks) for status in ("OK", "WARN", "FAIL")}
    status = "FAIL" if counts["FAIL"] else "WARN" if counts["WARN"] else "OK"
    return {
        "status": status,
        "ok": counts["OK"],
        "warn": counts["WARN"],
        "fail": counts["FAIL"],
        "exit_code": 1 if counts["FAIL"] else 0,
        "quick": quick,
    }


def render_text(checks: list[Check], summary: dict[str, Any]) -> str:
    width = max((len(c.name) for c in checks), default=0)
    lines = [f"{c.status:<4}  {c.name:<{width}}  {c.detail}" for c in checks]
    lines.append(
        f"{summary['status']}: {summary['ok']} ok, {plural(summary['warn'], 'warning')}, "
        f"{plural(summary['fail'], 'failure')}"
        + (" (--quick: models not loaded)" if summary["quick"] else "")
    )
    return "\n".join(lines)


def render_json(checks: list[Check], summary: dict[str, Any]) -> str:
    return json.dumps(
        {"checks": [c.to_dict() for c in checks], "summary": summary}, ensure_ascii=False, indent=2
    )


def startup_warnings(settings: Settings, connection: redis.Redis | None = None) -> list[str]:
    """The cheap checks' problems, one ``"STATUS name: detail"`` string each (empty when all is well): Redis
    server, eviction policy and persistence, the URI policy, device, driver and GPUs, the CPU budget and
    thread counts. Loads no model and never raises; meant for a worker to log at start-up. ``connection``
    should have socket timeouts (an unanswering server would block here); None: a client with 5 s timeouts
    on ``settings.redis_url``."""
    checks = guarded("redis", redis_checks, settings, connection, with_keys=False)
    checks += guarded("allowed-uris", policy_checks, settings)
    checks += guarded("device", device_checks, settings)
    checks += guarded("cpu-budget", cpu_checks, settings)
    return [f"{c.status} {c.name}: {c.detail}" for c in checks if c.status != "OK"]


def log_startup_warnings(
    settings: Settings, connection: redis.Redis | None = None, logger: logging.Logger | None = None
) -> list[str]:
    """:func:`startup_warnings`, each logged on ``logger`` (FAIL as ERROR, WARN as WARNING); returns them."""
    logger = logger or log
    messages = startup_warnings(settings, connection)
    for message in messages:
        logger.log(logging.ERROR if message.startswith("FAIL") else logging.WARNING, "doctor: %s", message)
    return messages


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as one JSON document")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="skip the slow checks (building the models, text-encoder forward pass, checkpoint "
        "compatibility, CUDA decoder context)",
    )
    parser.add_argument(
        "--lock",
        default=None,
        metavar="FILE",
        help="lock file to compare installed versions with (default: $TAGSTREAM_LOCK_FILE, else "
        "requirements/requirements-runtime-pyX.Y.txt of the checkout)",
    )
    add_settings_arguments(parser, SETTINGS)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        checks = [fail("settings", f"invalid: {errors}")] + guarded("versions", version_checks)
        checks += guarded("lock", lambda: check_lock(*find_lock(args.lock)))
    else:
        checks = run_checks(settings, lock=args.lock, quick=args.quick)
    summary = summarize(checks, args.quick)
    print(render_json(checks, summary) if args.json else render_text(checks, summary), flush=True)
    return int(summary["exit_code"])
