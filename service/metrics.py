"""Prometheus metrics. Scan counts and durations are read from the job table at scrape time, so every
API replica reports the same numbers, whichever worker ran the scans."""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from service.jobs import JobStore
from service.models import JobStatus
from service.queue import ScanQueue

__all__ = ["Metrics"]

DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class _JobCollector(Collector):
    def __init__(self, store: JobStore, queue: ScanQueue):
        self.store = store
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        counts = self.store.counts_by_status()
        scans = GaugeMetricFamily("bds_scans", "Scans in the job table by status", labels=["status"])
        for status in JobStatus:
            scans.add_metric([status.value], counts.get(status.value, 0))
        yield scans

        durations: list[float] = sorted(self.store.durations())
        buckets = [(f"{bound:g}", float(bisect.bisect_right(durations, bound))) for bound in DURATION_BUCKETS]
        buckets.append(("+Inf", float(len(durations))))
        yield HistogramMetricFamily(
            "bds_scan_duration_seconds", "Run time of finished scans", buckets=buckets, sum_value=sum(durations)
        )
        yield GaugeMetricFamily(
            "bds_queue_depth", "Scan messages waiting in the queue", value=self.queue.pending_count()
        )


class Metrics:
    """The registry of one app (one per app, so tests can build many)."""

    def __init__(self, store: JobStore, queue: ScanQueue):
        self.registry = CollectorRegistry()
        self.registry.register(_JobCollector(store, queue))
        self.upload_bytes = Counter("bds_upload_bytes", "Bytes received in scan uploads", registry=self.registry)
        self.requests = Counter(
            "bds_http_requests", "HTTP requests served", ["method", "status"], registry=self.registry
        )
