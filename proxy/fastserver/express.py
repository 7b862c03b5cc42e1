"""The express path: a request answered from protocol callbacks alone (issue 10).

A route whose filters are all sync (proxy/chain.py ``Fused``) and whose
upstream is the fast client is served without any coroutine when nothing has
to wait: the client's parsed request is admitted, the filters' befores run,
the request head is written on an idle pooled upstream connection, and the
upstream connection's callback (``Conn.start_express``) writes the answer,
after the filters' afters, in one go. That removes the request coroutine,
its context, the upstream future and the wake-ups through every coroutine
frame: most of the sidecar's own CPU per request in the bench.

Whenever something would have to wait, the request is handed to the
coroutine path (exchange.handle) at the point it reached, so behaviour is
that of the chain (the differential and chain tests hold both to it):

- no idle pooled connection (a connect, a pool wait): the upstream exchange;
- a before that answers, raises or defers: the chain's own continuation;
- a stale pooled connection reset before any response byte: a fresh one,
  when repeating the request is safe (as ``FastUpstream`` does);
- a response whose body is not all there with its head (streaming, SSE,
  HEAD/204/304): written by the coroutine path;
- a request with a body, an ``Expect``, a WebSocket: the coroutine path
  from the start.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from ..admission import request_id
from ..body import WHOLE
from ..chain import Exchange, Fused, ProxyResponse
from ..errors import UpstreamTimeout
from ..fastclient.conn import _Failed, _map
from ..fastclient.request import prepare
from ..fastclient.send import FastUpstream, retry_fresh
from ..rawexchange import RawResponse, set_fields
from .drive import drive
from .exchange import Admitted, _log, answer, answer_framing, failure, handle
from .response import EMPTY_STATUS, REASONS, http_date

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ..fastclient.conn import Conn
    from ..routes import Route
    from .head import FastHead
    from .protocol import ServerConnection


class Express:
    """A route's express path: its fused sync filters and its fast upstream."""

    __slots__ = ("fused", "upstream", "observe")

    def __init__(self, fused: Fused, upstream: FastUpstream, observe: "Callable[[float], None]") -> None:
        self.fused = fused
        self.upstream = upstream
        self.observe = observe  # the route's upstream duration histogram


def start(conn: "ServerConnection", head: "FastHead") -> Any:
    """Answer ``head``: on the express path when it can, else by the request
    coroutine. Returns what connection_lost cancels."""
    if head.reject is not None or head.has_body:
        return drive(handle(conn, head), conn.loop)
    srv = conn.server
    rid = request_id(head)
    srv.rt.metrics.enter()
    try:
        route, ex, continue_ = srv.admission.admit(head, srv.match, rid, head.started)
    except Exception as e:
        answer(conn, head, None, None, rid, failure(e, rid))
        return None
    x = route.express
    if x is None or continue_ or "_websocket" in ex.vars:
        return drive(handle(conn, head, Admitted(rid, route, ex, continue_)), conn.loop)
    fused = x.fused
    i = 0
    try:
        for i, b in fused.steps:
            r = b(ex)
            if r is not None:
                if r.__class__ is ProxyResponse and not fused.unwinds:
                    return _answer(conn, head, route, ex, rid, r)
                return drive(handle(conn, head, Admitted(rid, route, ex, aw=fused.slow(ex, i, r))), conn.loop)
    except Exception as e:
        return _failed(conn, head, route, ex, rid, fused.errored(i, ex, e))
    up = x.upstream
    deadline = ex.deadline
    t0 = time.monotonic()
    try:
        if deadline is not None and deadline - t0 <= 0:
            raise UpstreamTimeout()
        data, payload, stream, chunked = prepare(up.base_path, up._host_line, up.authority, ex)
    except Exception as e:
        _timing(ex, x.observe, t0)
        return _failed(conn, head, route, ex, rid, fused.errored(fused.n, ex, e))
    upc = up.pool.take_idle() if stream is None else None
    if upc is None:
        aw = _timed(ex, up._exchange(ex, data, payload, stream, chunked), x.observe, t0)
        return drive(handle(conn, head, Admitted(rid, route, ex, aw=fused.around_all(ex, aw))), conn.loop)
    req = ExpressRequest(conn, head, route, ex, rid, x, upc, data, payload, t0)
    upc.begin(ex.method == "HEAD", up._idle, deadline, up._max_head, up._max_headers)
    upc._upgrade = False
    upc.start_express(req.on_upstream, req)
    srv.batch.write(upc.transport, data + payload if payload else data)
    return req


def _failed(conn: "ServerConnection", head: "FastHead", route: "Route", ex: Exchange, rid: str,
            x: Any) -> Any:
    """Answer what ``Fused.errored`` gave: the JSON error for an exception, or
    the coroutine path awaiting the response an ``Again`` gives (retry)."""
    if isinstance(x, BaseException):
        answer(conn, head, route, ex, rid, failure(x, rid))
        return None
    return drive(handle(conn, head, Admitted(rid, route, ex, aw=x)), conn.loop)


def _answer(conn: "ServerConnection", head: "FastHead", route: "Route", ex: Exchange, rid: str,
            resp: ProxyResponse) -> Any:
    if isinstance(resp.body, WHOLE):
        answer(conn, head, route, ex, rid, resp)
        return None
    return drive(handle(conn, head, Admitted(rid, route, ex, resp=resp)), conn.loop)


def _timing(ex: Exchange, observe: "Callable[[float], None]", t0: float) -> None:
    """The route terminal's timing (runtime._terminal): the upstream duration
    histogram and the access log's ``upstream_ms``."""
    took = time.monotonic() - t0
    observe(took)
    ex.vars["upstream_s"] = took  # rounded to ms when a log line is made (round() ~0.35 µs)


async def _timed(ex: Exchange, aw: "Awaitable[ProxyResponse]", observe: "Callable[[float], None]",
                 t0: float) -> ProxyResponse:
    try:
        return await aw
    finally:
        _timing(ex, observe, t0)


class ExpressRequest:
    """One request waiting on its upstream connection's callback; stands in
    for the request's task (connection_lost cancels it)."""

    __slots__ = ("conn", "head", "route", "ex", "rid", "x", "upc", "data", "payload", "t0", "finished")

    def __init__(self, conn: "ServerConnection", head: "FastHead", route: "Route", ex: Exchange, rid: str,
                 x: Express, upc: "Conn", data: bytes, payload: bytes, t0: float) -> None:
        self.conn = conn
        self.head = head
        self.route = route
        self.ex = ex
        self.rid = rid
        self.x = x
        self.upc = upc
        self.data = data
        self.payload = payload
        self.t0 = t0
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def cancel(self, msg: Any = None) -> bool:
        """The client went away before the answer: close the upstream
        connection (its request is abandoned) and log 499, as the coroutine
        path does when its task is cancelled."""
        if self.finished:
            return False
        self.finished = True
        upc = self.upc
        upc._express = None
        upc.close()
        ex = self.ex
        self._timing()
        x = self.x.fused.errored(self.x.fused.n, ex, asyncio.CancelledError())
        if not isinstance(x, BaseException):
            x.close()  # an Again for a request whose client left: not run
        conn = self.conn
        _log(conn.server, self.head, self.route, ex, self.rid, 499, "client_closed")
        conn.server.rt.metrics.leave()
        conn.finished(self.head, False)
        return True

    def _timing(self) -> None:
        _timing(self.ex, self.x.observe, self.t0)

    def on_upstream(self, upc: "Conn") -> None:
        """The upstream connection's callback: the response head arrived
        (maybe with its whole body), or the exchange failed."""
        if self.finished:
            return
        self.finished = True
        conn, head, route, ex, rid, x = self.conn, self.head, self.route, self.ex, self.rid, self.x
        fused = x.fused
        if not upc._status:
            err = upc._error or _Failed("reset", "upstream closed the connection", got_nothing=not upc._got_bytes)
            upc.close()
            if retry_fresh(err, upc.requests > 1, ex.method):
                up = x.upstream
                aw = _timed(ex, up._exchange(ex, self.data, self.payload, None, False, fresh=True), x.observe,
                            self.t0)
                self._handover(drive(handle(conn, head, Admitted(rid, route, ex, aw=fused.around_all(ex, aw))),
                                     conn.loop))
                return
            self._timing()
            task = _failed(conn, head, route, ex, rid, fused.errored(fused.n, ex, _map(err, upc.pool)))
            if task is not None:
                self._handover(task)  # a filter asked for the rest of the chain again (retry)
            return
        _timing(ex, x.observe, self.t0)
        upc._headers_done()
        head_request = upc._head_request
        try:
            resp = FastUpstream.response(upc)
            if fused.unwinds:
                resp = fused.after_all(ex, resp)
        except Exception as e:
            answer(conn, head, route, ex, rid, failure(e, rid))
            return
        if not isinstance(resp, ProxyResponse):
            # A filter's after asked for the rest of the chain again (retry):
            # the coroutine path awaits that.
            self._handover(drive(handle(conn, head, Admitted(rid, route, ex, aw=resp)), conn.loop))
            return
        body = resp.body
        if isinstance(body, WHOLE):
            pairs = resp.raw_headers() if type(resp) is RawResponse else None
            if pairs is not None and not head_request and resp.status not in EMPTY_STATUS:
                edits = ex.response_headers
                edited = set_fields(pairs, edits) if edits else pairs
                if edited is not None:
                    _raw_answer(conn, head, route, ex, rid, resp.status, resp.reason, edited, body)
                    return
            answer(conn, head, route, ex, rid, resp)
        else:
            # Streaming (or a HEAD/204/304 whose empty body the lease ends):
            # the coroutine path writes it.
            self._handover(drive(handle(conn, head, Admitted(rid, route, ex, resp=resp)), conn.loop))

    def _handover(self, task: Any) -> None:
        """The coroutine path has the request now: connection_lost cancels that."""
        if self.conn.active is self.head:
            self.conn.task = task


# (version, status, upstream reason) -> the status line as bytes: the few an
# upstream sends, made once. Bounded: a reason phrase is the upstream's to make up.
_STATUS_LINES: dict[tuple[str, int, str | None], bytes] = {}


def _status_line(version: str, status: int, reason: str | None) -> bytes:
    line = ("HTTP/%s %d %s" % (version, status, REASONS.get(status, "") if reason is None else reason)
            ).encode("utf-8", "surrogateescape")
    if len(_STATUS_LINES) >= 256:
        _STATUS_LINES.clear()
    _STATUS_LINES[(version, status, reason)] = line
    return line


def _raw_answer(conn: "ServerConnection", head: "FastHead", route: "Route", ex: Exchange, rid: str,
                status: int, reason: str | None, pairs: list[tuple[bytes, bytes]], body: bytes) -> None:
    """Write an upstream's whole answer from its header fields as bytes (no
    filter read ``resp.headers``: proxy/rawexchange.py RawResponse). The bytes
    are those ``answer`` would write from the mapping (the server differential
    test holds both servers to the same output): the fields minus the
    hop-by-hop ones with the filters' ``response_headers`` set (``set_fields``),
    Content-Length set in place, then X-Request-ID when the upstream sent none
    (proxy/response_id.py), Date when absent, Connection where HTTP/1.x needs it."""
    version, keep = answer_framing(conn, head)
    line = _STATUS_LINES.get((version, status, reason))
    if line is None:
        line = _status_line(version, status, reason)
    # One flat list joined once: no intermediate "name: value" bytes, no
    # second copy of the body (bytes concatenation costs a buffer round trip).
    out = [line, b"\r\n"]
    length = b"Content-Length: %d\r\n" % len(body)
    upstream_id = alt_id = None
    has_length = has_date = False
    for k, v in pairs:
        lk = k.lower()
        if lk == b"content-length":
            if not has_length:
                has_length = True
                out.append(length)
            continue
        if lk == b"x-request-id":
            if upstream_id is None:
                upstream_id = v
        elif lk == b"request-id":
            if alt_id is None:
                alt_id = v
        elif lk == b"date":
            has_date = True
        out += (k, b": ", v, b"\r\n")
    if upstream_id is None:
        out += (b"X-Request-ID: ", rid.encode("utf-8", "surrogateescape"), b"\r\n")
        upstream_id = alt_id
    if upstream_id is not None:
        ex.vars["upstream_request_id"] = upstream_id.decode("utf-8", "surrogateescape")
    if not has_date:
        out += (b"Date: ", http_date().encode("ascii"), b"\r\n")
    if not has_length:
        out.append(length)
    if keep:
        if version == "1.0":
            out.append(b"Connection: keep-alive\r\n")
    elif version == "1.1":
        out.append(b"Connection: close\r\n")
    out += (b"\r\n", body)
    srv = conn.server
    try:
        conn.write_soon(b"".join(out))
        _log(srv, head, route, ex, rid, status, None)
    finally:
        srv.rt.metrics.leave()
        conn.finished(head, keep)
