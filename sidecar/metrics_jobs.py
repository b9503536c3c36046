"""Metrics of jobs (ComfyUI prompts), manifests and webhooks; registered only when the feature is on.

No label carries a prompt id, a key or a URL: jobs are counted by state and outcome only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600)
COMFY_OUTCOMES = ("ok", "unavailable")


class JobMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.comfy_requests = Counter(
            "sidecar_comfyui_requests_total", "GET requests to ComfyUI's job API, by outcome (ok, unavailable).",
            ["outcome"], registry=registry)
        self.jobs_done = Counter(
            "sidecar_jobs_done_total", "Jobs that ended here (every listed file stored or failed, the manifest "
            "written), by state (complete, failed).", ["state"], registry=registry)
        self.job_lag = Histogram(
            "sidecar_job_store_lag_seconds", "From ComfyUI's end of a prompt to its job being complete in the "
            "bucket (manifest included).", buckets=LAG_BUCKETS, registry=registry)
        self.manifests = Counter(
            "sidecar_manifests_total", "Manifest PUTs by outcome (written, existing, failed).", ["outcome"],
            registry=registry)
        self.held_for_prompt = Counter(
            "sidecar_files_held_for_prompt_total", "Upload attempts postponed because the key template needs "
            "{prompt_id} and ComfyUI has not named the prompt yet.", registry=registry)
        self.webhook_deliveries = Counter(
            "sidecar_webhook_deliveries_total", "Webhook delivery attempts by outcome (delivered, failed).",
            ["outcome"], registry=registry)
        self.webhook_lag = Histogram(
            "sidecar_webhook_delivery_lag_seconds", "From an event being queued to its delivery.",
            buckets=LAG_BUCKETS, registry=registry)
        for outcome in COMFY_OUTCOMES:
            self.comfy_requests.labels(outcome=outcome)
        for state in ("complete", "failed"):
            self.jobs_done.labels(state=state)
        for outcome in ("written", "existing", "failed"):
            self.manifests.labels(outcome=outcome)
        for outcome in ("delivered", "failed"):
            self.webhook_deliveries.labels(outcome=outcome)


class JobCollector(Collector):
    """Jobs by state and the webhook backlog, read from the journal at scrape time."""

    def __init__(self, counts: Callable[[], dict[str, int]],
                 backlog: Callable[[], tuple[int, float, float | None]], comfy_up: Callable[[], bool]) -> None:
        self._counts = counts
        self._backlog = backlog
        self._comfy_up = comfy_up

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("sidecar_jobs", "Jobs in the journal by state.", labels=["state"])
        for state, count in sorted(self._counts().items()):
            jobs.add_metric([state], count)
        yield jobs
        pending, oldest, _due = self._backlog()
        yield GaugeMetricFamily("sidecar_webhook_pending", "Webhook events not delivered yet.", value=pending)
        yield GaugeMetricFamily("sidecar_webhook_oldest_pending_age_seconds",
                                "Age of the oldest undelivered webhook event (0 if none).", value=oldest)
        yield GaugeMetricFamily("sidecar_comfyui_up", "1 if ComfyUI's job API answered the last request.",
                                value=1 if self._comfy_up() else 0)
