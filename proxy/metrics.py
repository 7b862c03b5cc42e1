"""Prometheus metrics, one registry per runtime.

With ``workers > 1`` the supervisor sets PROMETHEUS_MULTIPROC_DIR before the
workers start, prometheus-client writes each worker's values to shared files,
and /metrics aggregates them (MultiProcessCollector).
"""

from __future__ import annotations

import os
from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# Seconds; finer at the low end, where a sidecar's own overhead lives.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class BatchedCounter:
    """A counter child's increments kept as a plain int until the registry is
    read: prometheus-client's ``inc()`` takes a lock and costs 1-3 us, this
    ~0.1 us. Only touched from the event loop's thread."""

    __slots__ = ("child", "n")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.n = 0

    def inc(self) -> None:
        self.n += 1

    def flush(self) -> None:
        n = self.n
        if n:
            self.n = 0
            self.child.inc(n)


class BatchedHistogram:
    """A histogram child's observations counted per bucket until the registry
    is read (the same bucket rule as ``Histogram.observe``: the first upper
    bound >= the value)."""

    __slots__ = ("child", "bounds", "counts", "sum", "dirty")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds = list(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.dirty = False

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty:
            return
        child, counts = self.child, self.counts
        child._sum.inc(self.sum)
        for i, n in enumerate(counts):
            if n:
                child._buckets[i].inc(n)
                counts[i] = 0
        self.sum = 0.0
        self.dirty = False


class _Flusher:
    """Registered first, so every read of the registry (``collect()``, the
    /metrics exposition) adds the pending batched values before the metrics
    are collected."""

    def __init__(self, metrics: "Metrics") -> None:
        self.metrics = metrics

    def collect(self) -> list[Any]:
        self.metrics.flush()
        return []


class Metrics:
    """The core metrics plus a helper for plugins to add their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._made: dict[str, Any] = {}
        self.multiprocess = multiprocess_dir() is not None
        # By id() of the child (children live as long as their metric).
        self._batched: dict[int, BatchedCounter | BatchedHistogram] = {}
        r = self.registry
        r.register(_Flusher(self))
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
        # Requests in flight as a plain int read at collection time; with
        # several workers each one's value must live in its shared file.
        self.active = 0
        if self.multiprocess:
            self.enter, self.leave = self.inflight.inc, self.inflight.dec  # type: ignore[method-assign]
        else:
            self.inflight.set_function(lambda: float(self.active))

    def enter(self) -> None:
        self.active += 1

    def leave(self) -> None:
        self.active -= 1

    # Data-plane updates: batched in one process, direct with several workers
    # (another worker's /metrics reads the shared files, not this registry).

    def batched(self, child: Any) -> Any:
        """An object with ``inc()`` for a counter child (labels already applied)."""
        if self.multiprocess:
            return child
        b = self._batched.get(id(child))
        if b is None:
            b = self._batched[id(child)] = BatchedCounter(child)
        return b

    def batched_histogram(self, child: Any) -> Any:
        """An object with ``observe(v)`` for a histogram child."""
        if self.multiprocess or not hasattr(child, "_buckets"):
            return child
        b = self._batched.get(id(child))
        if b is None:
            b = self._batched[id(child)] = BatchedHistogram(child)
        return b

    def flush(self) -> None:
        for b in self._batched.values():
            b.flush()

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
