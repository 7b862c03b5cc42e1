"""Prometheus metrics, one registry per runtime.

With ``workers > 1`` the supervisor sets PROMETHEUS_MULTIPROC_DIR before the
workers start, prometheus-client writes each worker's values to shared files,
and /metrics aggregates them (MultiProcessCollector).

Data-plane updates are batched in plain ints on the loop's thread and added to
the metrics when the registry is read (one worker) and also every
``FLUSH_INTERVAL`` seconds with several workers, where a write costs an
mmap'ed-file update under a lock per observation and another worker's
/metrics reads the files, not this process (issue 10: the chain's CPU per
request rose 88 -> 111 us with workers = 2). Another worker's numbers are
then at most that old; this worker's own are flushed before it answers.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# Seconds between flushes of batched values to the shared files (workers > 1).
FLUSH_INTERVAL = 1.0

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
        self._inflight_child: Gauge | None = None   # set below; the registry collects while built
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
        # Requests in flight as a plain int: read at collection time (one
        # worker), or written to the worker's shared file at each flush.
        self.active = 0
        self._flushing: Any = None
        self._inflight_child = self.inflight if self.multiprocess else None
        if not self.multiprocess:
            self.inflight.set_function(lambda: float(self.active))

    def enter(self) -> None:
        self.active += 1

    def leave(self) -> None:
        self.active -= 1

    # Data-plane updates: batched, flushed when read and, with several
    # workers, every FLUSH_INTERVAL seconds (start_flushing).

    def batched(self, child: Any) -> Any:
        """An object with ``inc()`` for a counter child (labels already applied)."""
        b = self._batched.get(id(child))
        if b is None:
            b = self._batched[id(child)] = BatchedCounter(child)
        return b

    def batched_histogram(self, child: Any) -> Any:
        """An object with ``observe(v)`` for a histogram child."""
        if not hasattr(child, "_buckets"):
            return child
        b = self._batched.get(id(child))
        if b is None:
            b = self._batched[id(child)] = BatchedHistogram(child)
        return b

    def flush(self) -> None:
        for b in self._batched.values():
            b.flush()
        if self.multiprocess and self._inflight_child is not None:
            self._inflight_child.set(self.active)

    def start_flushing(self, interval: float = FLUSH_INTERVAL) -> None:
        """With several workers: write the batched values to this worker's
        shared files every ``interval`` seconds (call on the running loop)."""
        if not self.multiprocess or self._flushing is not None:
            return
        loop = asyncio.get_running_loop()

        def tick() -> None:
            self.flush()
            self._flushing = loop.call_later(interval, tick)

        self._flushing = loop.call_later(interval, tick)

    def stop_flushing(self) -> None:
        """Cancel the timer and write what is pending (shutdown)."""
        if self._flushing is not None:
            self._flushing.cancel()
            self._flushing = None
        self.flush()

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
            self.flush()   # this worker's pending values; the others' are at most FLUSH_INTERVAL old
            agg = CollectorRegistry()
            MultiProcessCollector(agg, path=path)
            return generate_latest(agg)
        return generate_latest(self.registry)
