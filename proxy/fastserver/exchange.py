"""One request on the fast server: admission, the route's chain, the response."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..admission import finish_headers, request_id
from ..body import WHOLE
from ..chain import Exchange, ProxyResponse
from ..errors import SidecarError
from ..fastclient.upgrade import Upgraded
from ..http import LAST_CHUNK, HeaderLineBreak, chunk, new_request_id
from .response import EMPTY_STATUS, http_date, serialize
from .tunnel import Tunnel

if TYPE_CHECKING:
    from ..routes import Route
    from .head import FastHead
    from .protocol import ServerConnection

log = logging.getLogger("sidecar.outbound")

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Admitted:
    """A request the express path admitted, handed to the coroutine path:
    ``aw`` (when set) is the awaitable of its response, else the route's chain
    runs; ``resp`` (when set) is a response to write (a streamed one)."""

    __slots__ = ("rid", "route", "ex", "continue_", "aw", "resp")

    def __init__(self, rid: str, route: "Route", ex: Exchange, continue_: bool = False,
                 aw: Any = None, resp: ProxyResponse | None = None) -> None:
        self.rid = rid
        self.route = route
        self.ex = ex
        self.continue_ = continue_
        self.aw = aw
        self.resp = resp


def failure(e: BaseException, rid: str) -> ProxyResponse:
    """The response for what a request's chain raised (not a cancellation)."""
    if isinstance(e, SidecarError):
        return ProxyResponse.error(e, rid)
    log.error("request %s failed inside the sidecar", rid, exc_info=e)
    return ProxyResponse.error(SidecarError(), rid)


async def handle(conn: "ServerConnection", head: "FastHead", pre: Admitted | None = None) -> None:
    srv = conn.server
    rt = srv.rt
    route: Route | None = None
    ex: Exchange | None = None
    metrics = rt.metrics
    # What the requests before this one left in the write batch goes first:
    # this path writes to the transport directly.
    conn.flush()
    if pre is None:
        # A malformed head's own X-Request-ID is not trusted (as for parse errors).
        rid = new_request_id() if head.malformed else request_id(head)
        metrics.enter()
    else:
        # The express path admitted it (and counted it in metrics.enter).
        rid, route, ex = pre.rid, pre.route, pre.ex
    keep = False
    try:
        resp = pre.resp if pre is not None else None
        if resp is None:
            try:
                if pre is None:
                    if head.reject is not None:
                        raise head.reject
                    route, ex, continue_ = srv.admission.admit(head, srv.match, rid, head.started)
                else:
                    continue_ = pre.continue_
                if continue_ and head.version == "1.1":
                    conn.transport.write(CONTINUE)  # type: ignore[union-attr]
                assert route is not None and ex is not None
                resp = await (pre.aw if pre is not None and pre.aw is not None else route.handler(ex))
            except asyncio.CancelledError:
                _log(srv, head, route, ex, rid, 499, "client_closed")
                raise
            except Exception as e:
                resp = failure(e, rid)
        try:
            try:
                keep, error = await respond(conn, head, resp, ex, rid)
            except HeaderLineBreak:
                # Nothing was written yet: a 500 instead of a split response (CWE-113).
                log.error("request %s: a response header contains a line break; answered 500", rid)
                resp.close()
                resp = ProxyResponse.error(SidecarError(), rid)
                keep, error = await respond(conn, head, resp, None, rid)
        except (asyncio.CancelledError, ConnectionError):
            # The client left while the response was streaming (how most SSE
            # streams end): the status went out, so log that.
            _log(srv, head, route, ex, rid, resp.status, "client_closed")
            raise
        _log(srv, head, route, ex, rid, resp.status,
             error or (None if resp.upstream else resp.headers.get("X-Sidecar-Error")))
    finally:
        metrics.leave()
        conn.finished(head, keep)


def answer(conn: "ServerConnection", head: "FastHead", route: "Route | None", ex: Exchange | None,
           rid: str, resp: ProxyResponse) -> None:
    """Write a response whose body is bytes, log it and finish the request
    (the express path's end: no coroutine; ``handle`` does the same)."""
    srv = conn.server
    keep = False
    try:
        try:
            keep = respond_whole(conn, head, resp, ex, rid)
        except HeaderLineBreak:
            log.error("request %s: a response header contains a line break; answered 500", rid)
            resp.close()
            resp = ProxyResponse.error(SidecarError(), rid)
            keep = respond_whole(conn, head, resp, None, rid)
        _log(srv, head, route, ex, rid, resp.status, None if resp.upstream else resp.headers.get("X-Sidecar-Error"))
    finally:
        srv.rt.metrics.leave()
        conn.finished(head, keep)


def _log(srv: Any, head: "FastHead", route: "Route | None", ex: Exchange | None, rid: str,
         status: int, error: str | None) -> None:
    srv.rt.access(head.method, head.target.partition("?")[0], route.name if route is not None else "",
                  ex, rid, status, head.started, error,
                  head.headers_view() if srv.rt._log_headers else None,
                  client=head.peer if ex is None else None)


async def respond(conn: "ServerConnection", head: "FastHead", resp: ProxyResponse,
                  ex: Exchange | None, rid: str) -> tuple[bool, str | None]:
    """Write ``resp``; returns (keep the connection, error code when the
    upstream failed after the status line went out)."""
    headers, version, keep, no_body = _prepare(conn, head, resp, ex, rid)
    status = resp.status
    method = head.method
    body = resp.body
    transport = conn.transport
    assert transport is not None
    if status == 101 and isinstance(body, Upgraded) and ex is not None and "_websocket" in ex.vars:
        return await _tunnel(conn, resp, body, ex, headers)
    if isinstance(body, WHOLE):
        _write_whole(conn, version, method, status, keep, no_body, body, resp, headers)
        return keep, None
    chunked = False
    if no_body:
        if status in EMPTY_STATUS:
            headers.popall("Content-Length", None)
        headers.popall("Transfer-Encoding", None)
    elif "Content-Length" not in headers:
        if version == "1.1":
            chunked = True
            headers["Transfer-Encoding"] = "chunked"
        else:
            keep = False  # HTTP/1.0: the end of the connection ends the body
    _connection(headers, keep, version)
    try:
        transport.write(serialize(version, status, resp.reason, headers))
        if body is not None:
            async for piece in body:
                if not piece or no_body:
                    continue
                if conn.closed:
                    raise ConnectionError("the client went away")
                transport.write(chunk(piece) if chunked else piece)
                if conn.paused_writing:
                    await conn.drain()
        if chunked:
            transport.write(LAST_CHUNK)
        resp.done()
    except SidecarError as e:
        # The upstream failed mid-body: the status is already sent, so the only
        # honest signal left is a cut connection (Envoy does the same).
        resp.close()
        log.warning("request %s: %s after the response started", rid, e.code)
        transport.abort()
        return False, e.code
    except BaseException:
        resp.close()
        raise
    return keep, None


async def _tunnel(conn: "ServerConnection", resp: ProxyResponse, body: Upgraded, ex: Exchange,
                  headers: Any) -> tuple[bool, str | None]:
    """Send the upstream's 101 and relay bytes both ways until a side closes."""
    assert conn.transport is not None
    headers.popall("Content-Length", None)
    conn.transport.write(serialize("1.1", 101, resp.reason, headers))
    timeouts = getattr(ex.route.upstream, "timeouts", None)
    tunnel = Tunnel(conn, body.conn, (timeouts.idle or None) if timeouts is not None else None)
    resp._release = None  # the tunnel owns the upstream connection now
    tail, conn.upgrade_tail = conn.upgrade_tail, b""
    tunnel.start(body.tail, tail)
    try:
        await asyncio.shield(tunnel.done)
    finally:
        if not tunnel.done.done():
            tunnel.close("sidecar")
        ex.log["websocket"] = {"to_upstream_bytes": tunnel.to_upstream, "to_client_bytes": tunnel.to_client,
                               "ended_by": tunnel.ended_by}
        # Once per session, not per request: the registry lookup is fine here.
        counter = conn.server.rt.metrics.counter(
            "sidecar_websocket_bytes", "Bytes relayed by WebSocket tunnels, by route and direction.",
            ["route", "direction"])
        counter.labels(ex.route.name, "to_upstream").inc(tunnel.to_upstream)
        counter.labels(ex.route.name, "to_client").inc(tunnel.to_client)
    return False, None


def _connection(headers: Any, keep: bool, version: str) -> None:
    if "Connection" not in headers:
        if keep:
            if version == "1.0":
                headers["Connection"] = "keep-alive"
        elif version == "1.1":
            headers["Connection"] = "close"


def _prepare(conn: "ServerConnection", head: "FastHead", resp: ProxyResponse, ex: Exchange | None,
             rid: str) -> tuple[Any, str, bool, bool]:
    """The finished response headers, the HTTP version to answer in, whether
    the connection is kept, whether the response has no body."""
    headers = finish_headers(resp, ex, rid)
    if "Date" not in headers:
        headers["Date"] = http_date()
    version, keep = answer_framing(conn, head)
    return headers, version, keep, resp.status in EMPTY_STATUS or head.method == "HEAD"


def answer_framing(conn: "ServerConnection", head: "FastHead") -> tuple[str, bool]:
    """The HTTP version to answer ``head`` in, and whether the connection is
    kept after the answer (both response writers, this one and express's)."""
    keep = head.keep_alive and not conn.closing
    if conn.input_done and not conn.queue and conn.pending_error is None:
        keep = False  # nothing after this request can be parsed (an upgrade, HTTP/0.9)
    if head.has_body and not head.complete:
        # Answered before the request body was read (an error, a cached or
        # short-circuit answer): do not leave the connection mid-body.
        keep = False
    return ("1.0" if head.version == "1.0" else "1.1"), keep


def respond_whole(conn: "ServerConnection", head: "FastHead", resp: ProxyResponse, ex: Exchange | None,
                  rid: str) -> bool:
    """Write ``resp`` (its body is bytes) at once; returns whether the connection is kept."""
    headers, version, keep, no_body = _prepare(conn, head, resp, ex, rid)
    _write_whole(conn, version, head.method, resp.status, keep, no_body, resp.body,  # type: ignore[arg-type]
                 resp, headers)
    return keep


def _write_whole(conn: "ServerConnection", version: str, method: str, status: int, keep: bool, no_body: bool,
                 body: bytes, resp: ProxyResponse, headers: Any) -> None:
    if method != "HEAD" or not resp.upstream:
        # RFC 9110 9.3.2: a HEAD answer says what a GET would get.
        headers["Content-Length"] = str(len(body))
    if status in EMPTY_STATUS:
        headers.popall("Content-Length", None)
    _connection(headers, keep, version)
    # Headers and body in one write (one syscall), sent with the loop pass's
    # other writes (proxy/writebatch.py).
    data = serialize(version, status, resp.reason, headers)
    conn.write_soon(data if no_body or not body else data + body)
    resp.done()
