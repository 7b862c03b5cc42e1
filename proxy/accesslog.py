"""One JSON line per request (orjson), written in batches off the request path.

Per request the runtime appends one tuple of raw values (``Runtime.access``);
the dicts and the JSON are made when the buffer is flushed, at most every
``interval`` seconds or every ``max_records`` requests, and at shutdown
(issue 10: the per-request dict + orjson cost 8-12 µs end to end).

The line's fields, in order: ``ts``, ``request_id``, ``route``, ``tenant``,
``method``, ``path``, ``status``, ``duration_ms``, ``worker``, then when
present ``upstream_ms``, ``attempts``, ``decisions`` (``ex.log``), ``error``,
``headers`` (``[logging] log_headers``), then the added fields.

Adding a field (docs/performance.md, "Access log"): at start-up, call
``runtime.accesslog.add_field(name, capture, render)``. ``capture(ex)`` runs
per request (``ex`` is None when no route matched) and should only pick a
value (``ex.client_ip``, ``ex.vars.get("upstream_request_id")``); ``render``
(optional) turns it into what is written, at flush time, so a hash or a
format costs nothing on the request path. A None value (captured or rendered)
leaves the field out. ``add_field`` with a core field's name and no capture
replaces how that field is rendered (e.g. a hashed ``tenant``).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import IO, Any

import orjson

# Positions in the record tuple Runtime.access appends (the order matters).
TS, RID, ROUTE, TENANT, METHOD, PATH, STATUS, TOOK, UPSTREAM, ATTEMPT, LOG, ERROR, HEADERS, EXTRA = range(14)
_NEWLINE = orjson.OPT_APPEND_NEWLINE
CORE = ("ts", "request_id", "route", "tenant", "method", "path", "status", "duration_ms", "worker",
        "upstream_ms", "attempts", "decisions", "error", "headers")


class AccessLog:
    """Buffers raw records and writes JSON lines at most every ``interval``
    seconds (or every ``max_records``), so a request never waits on a write
    to stdout nor pays for the JSON."""

    def __init__(self, target: str, interval: float = 0.05, worker: int = 0, max_records: int = 2048) -> None:
        self.enabled = target != "off"
        self._own = False
        self._out: IO[bytes] | None = None
        if target == "stdout":
            self._out = sys.stdout.buffer
        elif target == "stderr":
            self._out = sys.stderr.buffer
        elif self.enabled:
            self._out = open(target, "ab")  # noqa: SIM115 - closed in close()
            self._own = True
        self._buf: list[tuple[Any, ...]] = []
        self._interval = interval
        self._max = max_records
        self._scheduled = False
        self.worker = worker
        # Added fields: (name, capture, render); captures run per request.
        self._fields: list[tuple[str, Callable[[Any], Any], Callable[[Any], Any] | None]] = []
        self.captures: tuple[Callable[[Any], Any], ...] = ()
        self._render_core: dict[str, Callable[[Any], Any]] = {}

    def add_field(self, name: str, capture: Callable[[Any], Any] | None = None,
                  render: Callable[[Any], Any] | None = None) -> None:
        """Add a field to every line (see the module docstring)."""
        if name in CORE:
            if capture is not None or render is None:
                raise ValueError(f"access log: {name!r} is a core field: give only render= to change it")
            self._render_core[name] = render
            return
        if capture is None:
            raise ValueError(f"access log: field {name!r} needs a capture(ex) function")
        if any(n == name for n, _, _ in self._fields):
            raise ValueError(f"access log: field {name!r} is already added")
        self._fields.append((name, capture, render))
        self.captures = tuple(c for _, c, _ in self._fields)

    def append(self, record: tuple[Any, ...]) -> None:
        """One request's raw values, in the order of the positions above."""
        buf = self._buf
        buf.append(record)
        if len(buf) >= self._max:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(self._interval, self._timer)

    def _timer(self) -> None:
        self._scheduled = False
        self.flush()

    def lines(self, records: list[tuple[Any, ...]]) -> bytes:
        """The JSON lines of ``records`` (what flush writes)."""
        worker = self.worker
        fields = self._fields
        rc = self._render_core
        dumps = orjson.dumps
        # One growing buffer, each line appended and its bytes object freed
        # at once: keeping thousands of separate dumps() results alive until
        # a join made every dumps() take a fresh ~1 KB block from malloc, ~2 µs
        # a line (3.7 -> 1.6 µs a record measured, docs/performance.md).
        out = bytearray()
        # Milliseconds to three places as int(x * 1e6 + 0.5) / 1000 (the
        # nearest double, as round() gives; round(x, 3) costs ~0.37 µs, this
        # ~0.14: three per line). All values here are positive.
        for r in records:
            d: dict[str, Any] = {
                "ts": int(r[TS] * 1000 + 0.5) / 1000, "request_id": r[RID], "route": r[ROUTE],
                "tenant": r[TENANT], "method": r[METHOD], "path": r[PATH], "status": r[STATUS],
                "duration_ms": int(r[TOOK] * 1_000_000 + 0.5) / 1000, "worker": worker,
            }
            if r[UPSTREAM] is not None:
                d["upstream_ms"] = int(r[UPSTREAM] * 1_000_000 + 0.5) / 1000
            if r[ATTEMPT] > 1:
                d["attempts"] = r[ATTEMPT]
            if r[LOG]:
                d["decisions"] = r[LOG]
            if r[ERROR]:
                d["error"] = r[ERROR]
            if r[HEADERS] is not None:
                d["headers"] = r[HEADERS]
            if rc:
                for name, render in rc.items():
                    if d.get(name) is not None:
                        v = render(d[name])
                        if v is None:
                            del d[name]
                        else:
                            d[name] = v
            extra = r[EXTRA]
            if extra:
                for (name, _, fmt), v in zip(fields, extra):
                    if v is not None and fmt is not None:
                        v = fmt(v)
                    if v is not None:
                        d[name] = v
            try:
                out += dumps(d, option=_NEWLINE)
            except TypeError:
                # A field value orjson cannot write: the line still goes out,
                # with that value as its repr rather than dropping the request.
                out += dumps(d, default=repr, option=_NEWLINE)
        return bytes(out)

    def flush(self) -> None:
        if not self._buf or self._out is None:
            self._buf.clear()
            return
        records, self._buf = self._buf, []
        try:
            data = self.lines(records)
        except Exception:  # noqa: BLE001 - a broken render must not lose the batch silently
            import logging

            logging.getLogger("sidecar.accesslog").exception("access log: %d lines could not be written",
                                                            len(records))
            return
        try:
            self._out.write(data)
            self._out.flush()
        except (OSError, ValueError):  # closed pipe: dropping log lines beats dying
            pass

    def close(self) -> None:
        self.flush()
        if self._own and self._out is not None:
            self._out.close()
