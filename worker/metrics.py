"""Every Prometheus metric Tagstream exports, in one place.

Naming follows the Prometheus rules: prefix ``tagstream_``, base units (seconds, bytes), ``_total``
for counters, bounded label values only (stages, outcomes, reasons and extractors are closed sets).
Dashboards and alert rules in ``deploy/`` reference exactly these names. The registry also carries
prometheus_client's process (``process_*``: memory, CPU, open fds, start time), platform
(``python_info``) and garbage-collector (``python_gc_*``) collectors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from worker.errors import REASONS

if TYPE_CHECKING:
    import torch

#: The stages of a video, in order: the ``stage`` label values here and the keys of a result document's
#: ``timings_s`` (:mod:`worker.engine.document`).
STAGES = ("queue_wait", "decode", "image", "audio", "text", "fusion", "total")
#: ``reused``: the job's result is the document another job of the same video wrote meanwhile
#: (:mod:`worker.jobs.claim`); the pipeline did not run again.
OUTCOMES = ("tagged", "failed", "retried", "handed_back", "reused")
#: Why the uploads bridge refused a ``tagstream:uploads`` entry (``tagstream:uploads:rejected``).
UPLOAD_REJECT_REASONS = ("missing_video_id", "invalid_video_id", "invalid_uri", "too_large", "enqueue_error")
EXTRACTORS = ("image", "audio", "text", "fusion")
QUEUE_STATES = ("queued", "started", "finished", "failed", "deferred", "scheduled")

# tagstream_stage_duration_seconds: one bucket layout for every stage (prometheus_client allows one per
# metric), from 50 us to an hour, at most 2x between neighbours (1-2-3-5 per decade up to 5 s; then
# 10 s, 20 s, 30 s, 1, 2, 3, 5, 10, 15, 20, 30 min, 1 h), so each stage's quantiles resolve its own range.
# Measured on 2 CPU cores (shipped checkpoint, EfficientNet-Lite0 + MiniLM, 1 fps), clips from 2 s 160x90
# to 120 s 640x360 and 60 s 1280x720, one at a time and five at once:
#   audio 0.1-16 ms, fusion 4.7-22 ms, text 9-76 ms, image 46 ms-3.3 s, decode 17 ms-2.6 s,
#   total 0.26-2.9 s; queue_wait is ~0 on an empty queue and minutes behind a backlog (jobs time out
#   after job_timeout_s = 15 min by default; 4 h videos are allowed), hence the top of an hour.
STAGE_BUCKETS = (
    0.00005, 0.0001, 0.0002, 0.0003, 0.0005,
    0.001, 0.002, 0.003, 0.005,
    0.01, 0.02, 0.03, 0.05,
    0.1, 0.2, 0.3, 0.5,
    1, 2, 3, 5,
    10, 20, 30, 60, 120, 180, 300, 600, 900, 1200, 1800, 3600,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The worker's metrics, registered on their own registry (one per process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ... (Linux)
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)  # python_gc_objects_collected_total, python_gc_collections_total, ...
        self.stage_seconds = Histogram(
            "tagstream_stage_duration_seconds",
            "Per-video latency of each pipeline stage (total = dequeue to result written; queue_wait = enqueue to dequeue).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.videos = Counter("tagstream_videos_total", "Videos finished, by outcome.", ["outcome"], registry=r)
        self.errors = Counter("tagstream_errors_total", "Failures, by reason code.", ["reason"], registry=r)
        self.frames = Counter("tagstream_frames_total", "Sampled frames run through the image extractor.", registry=r)
        self.frames_decoded = Counter("tagstream_frames_decoded_total", "Frames the decoder decoded.", registry=r)
        self.audio_seconds = Counter("tagstream_audio_seconds_total", "Seconds of audio processed.", registry=r)
        self.video_seconds = Counter("tagstream_video_seconds_total", "Seconds of video tagged.", registry=r)
        self.batch_size = Histogram(
            "tagstream_batch_size", "Items per extractor batch.", ["extractor"], buckets=BATCH_BUCKETS, registry=r
        )
        self.in_flight = Gauge("tagstream_in_flight_videos", "Videos in flight in this worker.", registry=r)
        self.queue_jobs = Gauge("tagstream_queue_jobs", "Jobs in the rq queue by state.", ["queue", "state"], registry=r)
        self.model_info = Gauge(
            "tagstream_model_info",
            "Constant 1, labelled with the loaded model version and extractor ids.",
            ["model_version", "image_extractor", "audio_extractor", "text_extractor", "device"],
            registry=r,
        )
        self.ready = Gauge("tagstream_ready", "1 when models are loaded and Redis is reachable.", registry=r)
        self.redis_up = Gauge("tagstream_redis_up", "1 when the last Redis call succeeded.", registry=r)
        self.redis_errors = Counter(
            "tagstream_redis_errors_total",
            "Redis calls that failed with a connection error or timeout (each retry counts).",
            registry=r,
        )
        self.orphans_recovered = Counter(
            "tagstream_orphaned_jobs_total",
            "Jobs whose worker stopped heartbeating, collected by this worker's maintenance.",
            registry=r,
        )
        self.uploads_rejected = Counter(
            "tagstream_uploads_rejected_total",
            "tagstream:uploads entries refused by the bridge (put on tagstream:uploads:rejected), by reason.",
            ["reason"],
            registry=r,
        )
        self.gpu_memory_bytes = Gauge(
            "tagstream_gpu_memory_bytes",
            "GPU memory of this worker's CUDA device: reserved/allocated by this process, used (all "
            "processes) and total. No series on CPU.",
            ["kind"],
            registry=r,
        )
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for outcome in OUTCOMES:
            self.videos.labels(outcome)
        for reason in REASONS:
            self.errors.labels(reason)
        for extractor in EXTRACTORS:
            self.batch_size.labels(extractor)
        for reason in UPLOAD_REJECT_REASONS:
            self.uploads_rejected.labels(reason)

    def track_gpu_memory(self, device: str | torch.device) -> bool:
        """Export ``tagstream_gpu_memory_bytes`` for ``device`` when it is a CUDA device, read at each
        scrape: ``reserved`` and ``allocated`` (torch's caching allocator in this process), ``used``
        (the whole device, all processes: total minus free) and ``total``. Any other device exports no
        series (returns False)."""
        import torch  # only when called: producers import this module (through jobs), and must not load torch

        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        gauge = self.gpu_memory_bytes

        def used() -> float:
            free, total = torch.cuda.mem_get_info(index)
            return float(total - free)

        gauge.labels("reserved").set_function(lambda: float(torch.cuda.memory_reserved(index)))
        gauge.labels("allocated").set_function(lambda: float(torch.cuda.memory_allocated(index)))
        gauge.labels("used").set_function(used)
        gauge.labels("total").set(float(torch.cuda.get_device_properties(index).total_memory))
        return True
