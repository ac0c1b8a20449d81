"""All worker configuration in one typed place.

Every field is read from an environment variable ``TAGSTREAM_<FIELD_NAME_UPPER>`` and can be
overridden by a CLI flag ``--field-name`` (see :func:`add_settings_arguments`). Lists are given
comma-separated in both (``TAGSTREAM_ALLOWED_ROOTS=/data,/media``).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.cpu_budget import cpu_budget

CsvList = Annotated[list[str], NoDecode]
CPU_SHARE_ENV = "TAGSTREAM_CPU_SHARE"
"""A supervised worker's share of the machine's CPU budget, set by its supervisor (not a setting)."""
NVDEC_MIN_SESSIONS = 8
"""Decode threads with NVDEC when ``decode_threads`` is 0: at least one per decoder engine (7 on an H100/H200)."""


class Settings(BaseSettings):
    """Worker, decoder and model settings. Defaults are the production defaults."""

    model_config = SettingsConfigDict(env_prefix="TAGSTREAM_", extra="ignore")

    # --- Redis and queue -------------------------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis URL; password, ACL user (redis://user:pass@host) and TLS (rediss://) work. Sentinel: "
        "redis+sentinel://[[user]:pass@]host:port[,host:port...]/MASTER_NAME[/DB][?sentinel_password=P] "
        "(the hosts are the sentinels, default port 26379; user:pass is the master's).",
    )
    queue: str = Field("tagging", description="rq queue name.")
    uri_template: str = Field(
        "", description="Template used when a job has no uri, e.g. /data/{video_id}.mp4."
    )
    job_retries: int = Field(3, description="rq Retry count for transient failures and crashed workers.")
    job_timeout_s: float = Field(900.0, description="Wall-clock limit of one tag job.")
    result_ttl_s: int = Field(
        7 * 86400, ge=0,
        description="Seconds tagstream:tags:{id} results, finished rq jobs and their rq results are kept "
        "(rq job result_ttl; also the upper bound a worker applies to any job's own result_ttl).",
    )  # fmt: skip
    failure_ttl_s: int = Field(
        7 * 86400, ge=0,
        description="Seconds failed documents and failed rq jobs (failed registry) are kept (rq job "
        "failure_ttl, whose rq default is one year; also the upper bound a worker applies).",
    )  # fmt: skip
    tagged_stream_maxlen: int = Field(
        100_000, ge=1, description="Approximate cap (XADD MAXLEN ~) of the tagstream:tagged event stream."
    )

    # --- worker lifecycle ---------------------------------------------------------------------------
    concurrency: int = Field(8, ge=1, description="K: jobs in flight per worker process.")
    workers_per_gpu: int = Field(
        1, ge=1,
        description="Worker processes per GPU under the --gpus supervisor, each with its own K job slots and "
        "metrics port; above 1 without --gpus means --gpus all (without GPUs: this many CPU workers). "
        "The workers share the CPU budget: each gets budget // workers (at least 1) for decode_threads 0 and, "
        "on CPU, inference_threads 0.",
    )  # fmt: skip
    decode_threads: int = Field(
        0, ge=0,
        description="Decode threads; 0 means the CPU budget (affinity mask and cgroup quota), at least 8 with NVDEC.",
    )  # fmt: skip
    heartbeat_interval_s: float = Field(5.0, gt=0, description="How often a worker renews its own and its jobs' heartbeats.")
    heartbeat_ttl_s: float = Field(20.0, gt=0, description="A job whose worker stops beating is orphaned after this.")
    maintenance_interval_s: float = Field(10.0, gt=0, description="How often a worker collects orphaned jobs.")
    shutdown_grace_s: float = Field(60.0, ge=0, description="SIGTERM: time to finish in-flight jobs.")
    max_jobs: int = Field(0, ge=0, description="Exit after this many jobs (0: never); recycles workers.")
    burst: bool = Field(False, description="Exit when the queue is empty and nothing is in flight.")
    metrics_port: int = Field(9108, description="Prometheus /metrics, /healthz, /readyz; 0 disables.")
    metrics_host: str = Field("0.0.0.0", description="Address the metrics and health server binds to.")
    log_level: str = Field("INFO", description="Python logging level: DEBUG, INFO, WARNING or ERROR.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log line format on stderr: text, or json (one JSON object per line)."
    )
    liveness_timeout_s: float = Field(
        120.0, gt=0,
        description="/healthz answers 503 once the work loop has not iterated for this long (a stuck worker).",
    )  # fmt: skip

    # --- batching -----------------------------------------------------------------------------------
    image_batch_size: int = Field(
        0, ge=0, description="Max frames per image-extractor batch, across videos (0: 64 on GPU, 8 on CPU)."
    )
    audio_batch_size: int = Field(128, ge=1, description="Max 0.96 s audio patches per audio-extractor batch.")
    text_batch_size: int = Field(64, ge=1, description="Max titles per text-encoder batch.")
    fusion_batch_size: int = Field(32, ge=1, description="Max videos per fusion-model batch.")
    batch_max_wait_s: float = Field(0.02, ge=0, description="Max wait for a batch to fill.")
    inference_threads: int = Field(
        0, ge=0, description="Extractor batches run at once (0: the CPU budget on CPU, 1 on GPU)."
    )

    # --- sampling and decode limits -----------------------------------------------------------------
    fps: float = Field(1.0, gt=0, description="Frames sampled per second of video.")
    max_frames: int = Field(300, ge=1, description="Longer videos are sampled uniformly.")
    max_duration_s: float = Field(4 * 3600.0, gt=0, description="Longer videos are refused (too_long).")
    max_pixels: int = Field(4096 * 2304, gt=0, description="Width x height limit per frame.")
    max_file_bytes: int = Field(8 * 1024**3, gt=0, description="Larger files or HTTP resources are refused.")
    open_timeout_s: float = Field(10.0, gt=0, description="Limit on opening a file or URL (timeout).")
    read_timeout_s: float = Field(30.0, gt=0, description="Limit on one network read (slow servers fail with timeout).")
    decode_budget_s: float = Field(300.0, gt=0, description="Decode wall-time budget per video.")
    allow_audio_only: bool = Field(False, description="Tag audio-only files instead of refusing them.")
    hwaccel: Literal["auto", "cuda", "none"] = Field(
        "auto",
        description="Video decoding: none (software), cuda (NVDEC; software for a video it fails on) or auto: "
        "NVDEC only on a GPU worker whose start-up probe (at most ~20 s) measured it faster than software; "
        "set cuda or none to skip the probe.",
    )  # fmt: skip
    max_aspect_ratio: float = Field(10.0, ge=1, description="Refuse video whose long/short side ratio exceeds this.")
    max_redirects: int = Field(5, ge=0, description="HTTP redirects followed; each target passes the URI policy.")
    decode_isolation: bool = Field(
        True, description="Decode in supervised child processes: an FFmpeg crash fails one video, not the worker."
    )
    decode_memory_limit_mb: int = Field(
        3072, ge=0, description="Address-space limit of each isolated decoder process (0: none; off with hwaccel)."
    )

    # --- URI policy ---------------------------------------------------------------------------------
    allowed_schemes: CsvList = Field(["file", "http", "https"], description="URI schemes a job may use.")
    allowed_hosts: CsvList = Field([], description="HTTP(S) hosts allowed; empty allows none.")
    allowed_roots: CsvList = Field([], description="Local directories allowed; empty allows none.")

    # --- model ---------------------------------------------------------------------------------------
    checkpoint: Path | None = Field(None, description="Fusion checkpoint dir; default: the shipped demo one.")
    image_arch: Literal["efficientnet_lite0", "resnet50", "mobilenet_v3_small"] = Field(
        "efficientnet_lite0", description="Image extractor; resnet50 and mobilenet_v3_small need image_weights."
    )
    image_weights: Path | None = Field(None, description="torchvision-format state dict for image_arch.")
    vggish_weights: Path | None = Field(None, description="torchvggish-layout state dict.")
    vggish_pca: Path | None = Field(None, description="torchvggish PCA params (optional).")
    text_encoder_dir: Path | None = Field(None, description="Local transformers model dir.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    top_k_tags: int = Field(5, ge=1, description="Level-2 tags (and level-1 categories) per result.")
    top_k_concepts: int = Field(5, ge=0, description="ImageNet concepts per result (0: none).")

    @field_validator("allowed_schemes", "allowed_hosts", "allowed_roots", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        """One of auto, cpu, cuda, cuda:N or mps (case and surrounding spaces ignored). Only the form is
        checked here; whether the machine has that device is checked when a worker starts."""
        device = value.strip().lower()
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
            raise ValueError("expected auto, cpu, cuda, cuda:N or mps")
        return device

    def resolved_decode_threads(self, *, hwaccel: str = "none") -> int:
        """``decode_threads``, or for 0: the CPUs this process may use (:meth:`resolved_cpu_budget`:
        affinity mask and cgroup quota, not the node's CPU count; a supervised worker's share), and with ``hwaccel`` ``cuda`` at least
        :data:`NVDEC_MIN_SESSIONS`: each decode thread (decoder process) is one NVDEC session, a session
        runs on one of the chip's decoder engines (7 on an H100/H200), so fewer sessions than engines leave
        engines idle whatever the CPU count."""
        if self.decode_threads:
            return self.decode_threads
        cpus = self.resolved_cpu_budget()
        return max(NVDEC_MIN_SESSIONS, cpus) if hwaccel == "cuda" else cpus

    def resolved_cpu_budget(self) -> int:
        """The CPUs the default (0) decode and CPU inference thread counts are made of: this worker's share
        when a ``--gpus`` supervisor started it (:data:`CPU_SHARE_ENV`, set for each child by
        :mod:`worker.service.supervisor`: the children share one machine), else the CPUs this process may
        use (:func:`worker.cpu_budget.cpu_budget`)."""
        share = os.environ.get(CPU_SHARE_ENV, "").strip()
        return int(share) if share.isdigit() and int(share) > 0 else cpu_budget().cpus

    def resolved_image_batch_size(self, device_type: str) -> int:
        """``image_batch_size``, or for 0: 64 on an accelerator, 8 on CPU. On CPU a large batch gains
        nothing per frame (the extractor runs it in micro-batches of 4 anyway) and holds one inference
        thread for a long time while the others idle; measured with ``scripts/bench_worker.py`` on 2 cores,
        8 against 64 took the worker from 1.9x to 2.1-2.4x the naive baseline (BENCHMARKS.md "Worker")."""
        if self.image_batch_size:
            return self.image_batch_size
        return 8 if device_type == "cpu" else 64

    def resolved_inference_threads(self, device_type: str) -> int:
        """``inference_threads``, or for 0: the CPU budget on a CPU device (as for decode threads), 1 on an
        accelerator."""
        if self.inference_threads:
            return self.inference_threads
        return self.resolved_cpu_budget() if device_type == "cpu" else 1


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings_arguments(parser: argparse.ArgumentParser, names: list[str] | None = None) -> None:
    """Add a ``--field-name`` flag for each Settings field (or only ``names``); default None = env."""
    group = parser.add_argument_group("settings (also TAGSTREAM_* environment variables)")
    for name, info in Settings.model_fields.items():
        if names is not None and name not in names:
            continue
        annotation = info.annotation
        kwargs: dict[str, Any] = {"default": None, "help": info.description}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(annotation) is Literal:
            kwargs["choices"] = list(get_args(annotation))
        else:
            kwargs["metavar"] = name.upper()
        group.add_argument(_flag(name), dest=f"setting_{name}", **kwargs)


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Environment first, then CLI flags that were given, then explicit ``overrides``."""
    given = {
        key.removeprefix("setting_"): value
        for key, value in vars(args).items()
        if key.startswith("setting_") and value is not None
    }
    return Settings(**{**given, **overrides})
