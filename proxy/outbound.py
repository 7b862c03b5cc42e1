"""The outbound data plane: service -> sidecar -> provider.

Per request: match the route, check limits, build the Exchange, run the
route's pre-compiled chain, stream the response back. No config parsing, no
pluggy calls and no regex compilation happen here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import StreamReader, web
from aiohttp.web_request import BaseRequest

from .admission import admission_for, finish_headers, request_id
from .chain import Exchange, ProxyResponse
from .errors import BadRequest, RequestBodyTooLarge, SidecarError, UpgradeNotSupported
from .http import strip_hop_by_hop
from .upstream import BodyOverflow

if TYPE_CHECKING:
    from .routes import Route
    from .runtime import Runtime

log = logging.getLogger("sidecar.outbound")


class ProxyStreamResponse(web.StreamResponse):
    """A StreamResponse that adds no headers of its own: aiohttp would add
    ``Server`` and a default ``Content-Type``; a proxy forwards what it got."""

    async def _prepare_headers(self) -> None:
        h = self._headers
        had_ct = "Content-Type" in h
        had_server = "Server" in h
        await super()._prepare_headers()
        if not had_ct:
            h.popall("Content-Type", None)
        if not had_server:
            h.popall("Server", None)


class AiohttpHead:
    """An aiohttp request as admission reads it (proxy/admission.py)."""

    __slots__ = ("request", "hin", "method", "target", "peer", "content_length", "has_body",
                 "header_count", "header_size", "get", "special")

    def __init__(self, request: BaseRequest) -> None:
        self.request = request
        self.hin = request.headers
        self.get = self.hin.get
        self.method = request.method
        # The target as sent (aiohttp's raw_path drops a '#fragment').
        self.target = request._message.path
        self.peer = request.remote
        self.content_length = request.content_length
        self.has_body = request.body_exists
        raw = request.raw_headers
        self.header_count = len(raw)
        size = 0
        for k, v in raw:
            size += len(k) + len(v) + 4
        self.header_size = size
        hin = self.hin
        self.special = "Upgrade" in hin or "Expect" in hin

    def build(self, route: "Route", path: str, query: str, extra: list[tuple[str, str]],
              drop_expect: bool, *, request_id: str, started: float, max_body: int,
              target: str | None = None, body_length: int | None = None, tenant: str | None = None,
              client_ip: str | None = None, deadline: float | None = None) -> Exchange:
        headers = strip_hop_by_hop(self.hin)
        if drop_expect:
            headers.popall("Expect", None)
        for k, v in extra:
            headers[k] = v
        ex = Exchange(route, self.method, path, query, headers, request_id=request_id, started=started,
                      max_body=max_body, target=target, body_length=body_length, tenant=tenant,
                      client_ip=client_ip, deadline=deadline)
        if self.has_body:
            overflow = BodyOverflow()
            ex.vars["_overflow"] = overflow
            ex.body = _counted(self.request.content, route.max_body, overflow)
        return ex


async def _counted(content: StreamReader, limit: int, overflow: BodyOverflow) -> AsyncIterator[bytes]:
    """The request body as it arrives, stopped once it passes the route's limit
    (aiohttp's client_max_size does not apply to a streamed body)."""
    seen = 0
    while True:
        chunk = await content.readany()
        if not chunk:
            return
        seen += len(chunk)
        if seen > limit:
            overflow.hit = True
            raise RequestBodyTooLarge()
        yield chunk


class OutboundHandler:
    """The aiohttp low-level handler of a listener: the outbound one with
    ``[outbound] server = "aiohttp"``, and (``listener="inbound"``,
    ``keep_path=True``) the inbound one.

    ``listener`` names the route table in ``runtime.tables``; ``keep_path``
    passes the whole request path on (the inbound listener forwards
    ``/api/orders`` to ``service_url/api/orders``) instead of the path after
    the route prefix.
    """

    def __init__(self, runtime: "Runtime", *, listener: str = "outbound", keep_path: bool = False) -> None:
        self.rt = runtime
        self.listener = listener
        self.admission = admission_for(runtime, listener, keep_path=keep_path)

    async def __call__(self, request: BaseRequest) -> web.StreamResponse:
        rt = self.rt
        started = time.monotonic()
        head = AiohttpHead(request)
        rid = request_id(head)
        route: Route | None = None
        ex: Exchange | None = None
        metrics = rt.metrics
        metrics.enter()
        try:
            close = False
            try:
                if request.version < (1, 0):
                    # issue 11: "GET /x" with no version was forwarded as
                    # HTTP/1.1 and answered as HTTP/0.9; refuse it and close.
                    close = True
                    raise BadRequest("HTTP/0.9 requests are not supported")
                route, ex, continue_ = self._admit(request, head, rid, started)
                if continue_ and request.version >= (1, 1):
                    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                resp = await route.handler(ex)
            except SidecarError as e:
                resp = ProxyResponse.error(e, rid)
                # After a refused upgrade the client may send what is not HTTP/1.1.
                close = close or isinstance(e, UpgradeNotSupported)
            except asyncio.CancelledError:
                self._log(request, route, ex, rid, 499, started, "client_closed")
                raise
            except Exception:
                log.exception("request %s failed inside the sidecar", rid)
                resp = ProxyResponse.error(SidecarError(), rid)
            try:
                out, error = await self._send(request, resp, ex, rid, close)
            except (asyncio.CancelledError, ConnectionError):
                # The client left while the response was streaming (how most
                # SSE streams end): the status went out, so log that.
                self._log(request, route, ex, rid, resp.status, started, "client_closed")
                raise
            self._log(request, route, ex, rid, resp.status, started,
                      error or (None if resp.upstream else resp.headers.get("X-Sidecar-Error")))
            return out
        finally:
            metrics.leave()

    def _log(self, request: BaseRequest, route: "Route | None", ex: Exchange | None, rid: str,
             status: int, started: float, error: str | None) -> None:
        self.rt.access(request.method, request.raw_path.partition("?")[0],
                       route.name if route is not None else "", ex, rid, status, started, error,
                       request.headers, client=request.remote if ex is None else None)

    def match(self, path: str) -> "tuple[Route, str] | None":
        """The route for ``path`` in this listener's table."""
        return self.rt.tables[self.listener].match(path)

    def _admit(self, request: BaseRequest, head: AiohttpHead, rid: str,
               started: float) -> "tuple[Route, Exchange, bool]":
        return self.admission.admit(head, self.match, rid, started)

    async def _send(self, request: BaseRequest, resp: ProxyResponse, ex: Exchange | None,
                    rid: str, close: bool = False) -> tuple[web.StreamResponse, str | None]:
        """Stream ``resp`` to the client; returns the response and an error code
        when the upstream failed after the status line was sent."""
        headers = finish_headers(resp, ex, rid)
        out = ProxyStreamResponse(status=resp.status, reason=resp.reason, headers=headers)
        if close:
            out.force_close()
        if request.body_exists and not request.content.is_eof() and (
                ex is None or not isinstance(ex.body, bytes | None)):
            # Answered before the request body was read (an error, a cached or
            # short-circuit answer): do not leave the connection mid-body.
            out.force_close()
        body = resp.body
        try:
            if isinstance(body, bytes | bytearray):
                head = request.method == "HEAD"
                if not head or not resp.upstream:
                    out.content_length = len(body)
                # Headers and body in one write (one syscall) instead of two.
                out._send_headers_immediately = False
                await out.prepare(request)
                # RFC 9110 9.3.2: no content in a HEAD response, a sidecar
                # error included; the length says what a GET would get.
                await out.write_eof(b"" if head else body)
            else:
                await out.prepare(request)
                if body is not None:
                    async for chunk in body:
                        await out.write(chunk)
            await out.write_eof()
            resp.done()
        except SidecarError as e:
            # The upstream failed mid-body: the status is already sent, so the
            # only honest signal left is a cut connection (Envoy does the same).
            resp.close()
            log.warning("request %s: %s after the response started", rid, e.code)
            if request.transport is not None:
                request.transport.abort()
            return out, e.code
        except BaseException:
            resp.close()
            raise
        return out, None
