"""Every Prometheus metric of the service, defined once, in base units, on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Up to two minutes: /refine runs many gradient steps, and the default buckets stop at 10 s.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# A request's stages: parse and write take well under a millisecond, /refine's compute up to minutes; 1, 2, 5 per
# decade, so that a percentile read from the buckets is as fine at 0.2 ms as at 200 ms.
STAGE_BUCKETS = (
    0.0001,
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1,
    2,
    5,
    10,
    20,
    50,
    120,
    300,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GAIN_BUCKETS = (-0.5, -0.1, -0.05, -0.01, 0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)
REJECT_REASONS = ("queue_full", "deadline", "disconnected", "draining")
REQUEST_STAGES = ("parse", "queue", "compute", "encode", "write")  # server/timeline.py says what each covers
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The service's metrics; one instance per app so that tests can run several apps side by side."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "softdimo_requests", "Requests answered, by status code.", ["endpoint", "model", "status"], registry=r
        )
        self.request_duration = Histogram(
            "softdimo_request_duration_seconds",
            "Time from arrival to answer.",
            ["endpoint", "model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "softdimo_queue_wait_seconds",
            "Time a request waited before its batch started on the device, by lane.",
            ["endpoint", "model", "lane"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.request_stage = Histogram(
            "softdimo_request_stage_seconds",
            "Time a synchronous image request spent in each stage, arrival to answer written (server/timeline.py).",
            ["endpoint", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "softdimo_batch_size",
            "Images in an executed batch.",
            ["endpoint", "model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "softdimo_queue_depth", "Images waiting in the queue.", ["endpoint", "model"], registry=r
        )
        self.inflight = Gauge("softdimo_inflight_requests", "Requests being handled.", ["endpoint"], registry=r)
        self.images = Counter("softdimo_images_generated", "Images returned.", ["endpoint", "model"], registry=r)
        self.tteo_steps = Counter("softdimo_tteo_steps", "TTEO gradient steps run, per image.", ["model"], registry=r)
        self.checked_draws = Counter(
            "softdimo_checked_draws",
            "Images a draw check drew, redraws included; over the images it kept, the draws each cost.",
            ["endpoint", "model"],
            registry=r,
        )
        self.reward_gain = Histogram(
            "softdimo_reward_gain",
            "reward_after - reward_before of refined images.",
            ["model"],
            buckets=GAIN_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "softdimo_rejected", "Requests refused or dropped, by reason.", ["endpoint", "reason"], registry=r
        )
        self.batch_splits = Counter(
            "softdimo_batch_splits",
            "Batches that ran out of memory and were retried in halves.",
            ["endpoint", "model"],
            registry=r,
        )
        self.jobs = Counter("softdimo_jobs", "Jobs that ended, by final status.", ["endpoint", "status"], registry=r)
        self.jobs_submitted = Counter(
            "softdimo_jobs_submitted", "Jobs accepted into the store.", ["endpoint"], registry=r
        )
        # The store's backlog, not this process's: every process sharing a store reports the same count, so
        # aggregate it with max, not sum. Refreshed by each process's job runner every few seconds.
        self.jobs_queued = Gauge("softdimo_jobs_queued", "Jobs in the store waiting to be claimed.", registry=r)
        self.webhook_deliveries = Counter(
            "softdimo_webhook_deliveries",
            "Webhook calls, by outcome (delivered, retried, abandoned).",
            ["outcome"],
            registry=r,
        )
        # process_resident_memory_bytes, CPU seconds, open files (Linux): what a soak test watches for leaks.
        ProcessCollector(registry=r)

    def declare(self, endpoints: list[str], models: list[str]) -> None:
        """Export zeros for series known to exist, so rates and alerts have data from the first scrape."""
        for endpoint in endpoints:
            self.inflight.labels(endpoint)
            for reason in REJECT_REASONS:
                self.rejected.labels(endpoint, reason)
            for stage in REQUEST_STAGES:
                self.request_stage.labels(endpoint, stage)
            for model in models:
                self.queue_depth.labels(endpoint, model)
                self.images.labels(endpoint, model)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
