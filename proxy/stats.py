"""/admin/stats: per-route counters read back from the metrics registry.

The dashboard polls this (every 2 s) and turns counters into rates and a
p99 over the last interval from the deltas; the figures here are totals
since start, so any number of viewers see the same thing and nothing is
kept per viewer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from .metrics import multiprocess_dir

if TYPE_CHECKING:
    from .runtime import Runtime


def _samples(rt: "Runtime") -> Iterator[Any]:
    path = multiprocess_dir()
    if path:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)
    else:
        registry = rt.metrics.registry
    for metric in registry.collect():   # collect() flushes the batched values first
        yield from metric.samples


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile over cumulative (upper bound, count) pairs."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def route_stats(rt: "Runtime") -> dict[str, Any]:
    routes: dict[str, dict[str, Any]] = {}
    buckets: dict[str, dict[float, float]] = {}
    limits: dict[str, dict[str, float]] = {}

    def entry(name: str) -> dict[str, Any]:
        return routes.setdefault(name, {"requests": 0, "errors": 0, "statuses": {}})

    for s in _samples(rt):
        labels = s.labels
        if s.name == "sidecar_requests_total":
            name = labels.get("route") or "(no route)"
            e = entry(name)
            e["requests"] += s.value
            status = labels.get("status", "")
            e["statuses"][status] = e["statuses"].get(status, 0) + s.value
            if status >= "500":
                e["errors"] += s.value
        elif s.name == "sidecar_request_duration_seconds_bucket":
            le = float(labels["le"])
            b = buckets.setdefault(labels["route"], {})
            b[le] = b.get(le, 0.0) + s.value
        elif s.name == "sidecar_rate_limit_decisions_total":
            d = limits.setdefault(labels["route"], {})
            d[labels["result"]] = d.get(labels["result"], 0) + s.value
    for name, b in buckets.items():
        pairs = sorted(b.items())
        e = entry(name)
        e["buckets"] = [[le if not math.isinf(le) else "+Inf", n] for le, n in pairs]
        p99 = quantile(0.99, pairs)
        e["p99_ms"] = None if p99 is None else round(p99 * 1000, 3)
    for r in rt.table.routes:
        e = entry(r.name)
        e["prefix"] = r.prefix
        e["enabled"] = r.policy.core.enabled
    return {"at": time.time(), "routes": routes, "rate_limits": limits}
