"""Prometheus metrics, one registry per runtime.

With ``workers > 1`` the supervisor sets PROMETHEUS_MULTIPROC_DIR before the
workers start, prometheus-client writes each worker's values to shared files,
and /metrics aggregates them (MultiProcessCollector).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# Seconds; finer at the low end, where a sidecar's own overhead lives.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The core metrics plus a helper for plugins to add their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._made: dict[str, Any] = {}
        self.multiprocess = multiprocess_dir() is not None
        r = self.registry
        self.requests = Counter("sidecar_requests", "Requests handled, by route, method and status.",
                                ["route", "method", "status"], registry=r)
        self.duration = Histogram("sidecar_request_duration_seconds",
                                  "Time from request to last response byte, by route.",
                                  ["route"], buckets=BUCKETS, registry=r)
        self.upstream_duration = Histogram("sidecar_upstream_duration_seconds",
                                           "Time from sending upstream to response headers, by route.",
                                           ["route"], buckets=BUCKETS, registry=r)
        self.inflight = Gauge("sidecar_inflight_requests", "Requests in flight.",
                              registry=r, multiprocess_mode="livesum")
        self.reloads = Counter("sidecar_policy_reloads", "Policy reloads, by result.", ["result"], registry=r)

    # Plugins ask for their metrics from build(), once per route: the same
    # name returns the metric made the first time.

    def counter(self, name: str, doc: str, labels: list[str] | tuple[str, ...] = ()) -> Counter:
        return self._once(name, lambda: Counter(name, doc, list(labels), registry=self.registry))

    def gauge(self, name: str, doc: str, labels: list[str] | tuple[str, ...] = (), **kw: Any) -> Gauge:
        if self.multiprocess:
            kw.setdefault("multiprocess_mode", "livesum")
        return self._once(name, lambda: Gauge(name, doc, list(labels), registry=self.registry, **kw))

    def histogram(self, name: str, doc: str, labels: list[str] | tuple[str, ...] = (), **kw: Any) -> Histogram:
        kw.setdefault("buckets", BUCKETS)
        return self._once(name, lambda: Histogram(name, doc, list(labels), registry=self.registry, **kw))

    def _once(self, name: str, make: Any) -> Any:
        metric = self._made.get(name)
        if metric is None:
            metric = self._made[name] = make()
        return metric

    def exposition(self) -> bytes:
        """The text format; aggregated over every worker process when there are several."""
        path = multiprocess_dir()
        if path:
            agg = CollectorRegistry()
            MultiProcessCollector(agg, path=path)
            return generate_latest(agg)
        return generate_latest(self.registry)
