"""The record of one request: its metrics and its access-log line.

``Recorder.access`` runs once per request on every listener (the runtime's
``access``). It is its own module so that it is compiled with the request
path (setup.py; issue 10): as a method of the interpreted Runtime it cost
~5k instructions of the ~120k of a plain request (callgrind).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .accesslog import AccessLog
from .chain import Exchange
from .metrics import Metrics
from .redact import Redactor


def client_ip(ex: Exchange | None) -> str | None:
    """The access log's ``client`` field (the peer address)."""
    return ex.client_ip if ex is not None else None


class Recorder:
    def __init__(self, metrics: Metrics, accesslog: AccessLog, redactor: Redactor,
                 log_headers: list[str]) -> None:
        self.metrics = metrics
        self.accesslog = accesslog
        self.redactor = redactor
        self.log_headers = log_headers
        # prometheus-client's labels() costs ~2 µs a call: keep the children.
        self._count_children: dict[tuple[str, str, int], Callable[[], None]] = {}
        self._duration_children: dict[str, Callable[[float], None]] = {}

    def access(self, method: str, path: str, route_name: str, ex: Exchange | None, rid: str,
               status: int, started: float, error: str | None,
               headers: Any = None, client: str | None = None) -> None:
        """Record one request: access-log line and metrics (any listener).

        ``path`` is the request path without the query; ``route_name`` is ""
        when no route matched; ``headers`` (the client's, a mapping) is only
        read when ``[logging] log_headers`` asks for some; ``client`` is the
        peer address, logged when there is no ``ex`` (a request refused
        before a route matched is still traceable to who sent it).
        """
        took = time.monotonic() - started
        name = route_name
        key = (name, method, status)
        inc = self._count_children.get(key)
        if inc is None:
            metrics = self.metrics
            inc = self._count_children[key] = metrics.batched(metrics.requests.labels(name, method, str(status))).inc
        inc()
        if name:
            observe = self._duration_children.get(name)
            if observe is None:
                metrics = self.metrics
                observe = self._duration_children[name] = metrics.batched_histogram(
                    metrics.duration.labels(name)).observe
            observe(took)
        al = self.accesslog
        if not al.enabled:
            return
        # A tuple of raw values; the JSON is made at flush (proxy/accesslog.py).
        hdrs = (self.redactor.headers_dict(headers, self.log_headers)
                if self.log_headers and headers is not None else None)
        caps = al.captures
        extra: tuple[Any, ...] | None
        if not caps:
            extra = None
        elif ex is not None or client is None:
            extra = tuple([c(ex) for c in caps])
        else:
            extra = tuple([client if c is client_ip else c(None) for c in caps])
        if ex is not None:
            al.append((time.time(), rid, name, ex.tenant, method, path, status, took,
                       ex.vars.get("upstream_s"), ex.attempt, ex.log or None, error, hdrs, extra))
        else:
            al.append((time.time(), rid, name, None, method, path, status, took, None, 1, None, error, hdrs,
                       extra))
