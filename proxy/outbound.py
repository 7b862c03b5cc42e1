"""The outbound data plane: service -> sidecar -> provider.

Per request: match the route, check limits, build the Exchange, run the
route's pre-compiled chain, stream the response back. No config parsing, no
pluggy calls and no regex compilation happen here.
"""

from __future__ import annotations

import asyncio
import time
import ipaddress
import logging
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING
from urllib.parse import unquote

from aiohttp import web
from aiohttp.web_request import BaseRequest

from .chain import Exchange, ProxyResponse
from .errors import BadRequest, HeadersTooLarge, NoRoute, RequestBodyTooLarge, SidecarError
from .http import has_dot_segment, new_request_id, strip_hop_by_hop
from .upstream import BodyOverflow

if TYPE_CHECKING:
    from .routes import Route
    from .runtime import Runtime

log = logging.getLogger("sidecar.outbound")


_UNRESERVED_ESCAPE = re.compile(r"%(?:[46][1-9A-Fa-f]|[57][0-9Aa]|3[0-9]|2[DEde]|5[Ff]|7[Ee])")


def _unescape(m: "re.Match[str]") -> str:
    return chr(int(m.group(0)[1:], 16))


class ExpectationFailed(SidecarError):
    status, code, message = 417, "expectation_failed", "unsupported Expect header"


class UpgradeNotSupported(SidecarError):
    status, code, message = 501, "upgrade_not_supported", "protocol upgrades (WebSocket) are not proxied"


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


class TrustedProxies:
    """Peers whose X-Forwarded-* headers are kept and extended."""

    def __init__(self, entries: list[str]) -> None:
        self.nets = [ipaddress.ip_network(e, strict=False) for e in entries]

    def __contains__(self, addr: str | None) -> bool:
        if not self.nets or not addr:
            return False
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in n for n in self.nets)


async def _counted(content: "web.StreamReader", limit: int, overflow: BodyOverflow) -> AsyncIterator[bytes]:
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
    """The aiohttp low-level handler of a listener: the outbound one, and
    (``listener="inbound"``, ``keep_path=True``) the inbound one.

    ``listener`` names the route table in ``runtime.tables``; ``keep_path``
    passes the whole request path on (the inbound listener forwards
    ``/api/orders`` to ``service_url/api/orders``) instead of the path after
    the route prefix.
    """

    def __init__(self, runtime: "Runtime", *, listener: str = "outbound", keep_path: bool = False) -> None:
        self.rt = runtime
        self.listener = listener
        self.keep_path = keep_path
        self.trusted = TrustedProxies(runtime.settings.outbound.trusted_proxies)
        self.scheme = "http"

    async def __call__(self, request: BaseRequest) -> web.StreamResponse:
        rt = self.rt
        started = time.monotonic()
        hin = request.headers
        rid = hin.get("X-Request-ID") or new_request_id()
        route: Route | None = None
        ex: Exchange | None = None
        metrics = rt.metrics
        metrics.enter()
        try:
            try:
                route, ex = self._admit(request, hin, rid, started)
                if "Expect" in hin:
                    await self._expect(request, ex)
                resp = await route.handler(ex)
            except SidecarError as e:
                resp = ProxyResponse.error(e, rid)
            except asyncio.CancelledError:
                self._log(request, route, ex, rid, 499, started, "client_closed")
                raise
            except Exception:
                log.exception("request %s failed inside the sidecar", rid)
                resp = ProxyResponse.error(SidecarError(), rid)
            try:
                out, error = await self._send(request, resp, ex, rid)
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
                       request.headers)

    async def _expect(self, request: BaseRequest, ex: Exchange) -> None:
        """RFC 9110 10.1.1: answer ``100-continue`` ourselves once the request
        passed the route and size checks (as nginx does), and do not forward it:
        the body is already on its way. Any other expectation is 417."""
        expect = ex.headers.popall("Expect", [""])[0]
        if expect.lower() != "100-continue":
            raise ExpectationFailed(f"unsupported expectation {expect[:40]!r}")
        if request.version >= (1, 1) and request.body_exists:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def match(self, path: str) -> "tuple[Route, str] | None":
        """The route for ``path`` in this listener's table."""
        return self.rt.tables[self.listener].match(path)

    def _admit(self, request: BaseRequest, hin, rid: str, started: float) -> "tuple[Route, Exchange]":
        raw = request.raw_path
        path, _, query = raw.partition("?")
        if not path.startswith("/"):
            raise BadRequest("request target must be a path (origin-form)")
        if has_dot_segment(path):
            raise BadRequest("path must not contain '.' or '..' segments")
        if self.keep_path and "%" in path:
            # Inbound, the service's framework routes the decoded path.
            # Escaped unreserved characters are the same URI (RFC 3986
            # 6.2.2.2): normalised, so what filters match (rate_limit's
            # per-path limits) is what the service routes ("/log%69n" is
            # "/login"). Routes are matched fully decoded, or "/api%2Fx"
            # would take a less protected enclosing route to the service's /api.
            path = _UNRESERVED_ESCAPE.sub(_unescape, path)
            m = self.match(unquote(path))
        else:
            m = self.match(path)
        if m is None:
            raise NoRoute(f"no route for {path}")
        route, rest = m
        raw_headers = request.raw_headers
        if len(raw_headers) > route.max_headers:
            raise HeadersTooLarge(f"more than {route.max_headers} request headers")
        size = 0
        for k, v in raw_headers:
            size += len(k) + len(v) + 4
        if size > route.max_header_size:
            raise HeadersTooLarge(f"request headers exceed {route.max_header_size} bytes")
        if "Upgrade" in hin and "upgrade" in hin.get("Connection", "").lower():
            # WebSocket and other upgrades are not proxied: refuse clearly
            # rather than forward a request that silently lost its Upgrade.
            raise UpgradeNotSupported()
        length = request.content_length
        if length is not None and length > route.max_body:
            raise RequestBodyTooLarge(f"request body exceeds {route.max_body} bytes")
        headers = strip_hop_by_hop(hin)
        peer = request.remote
        if peer in self.trusted:
            xff = hin.get("X-Forwarded-For")
            headers["X-Forwarded-For"] = f"{xff}, {peer}" if xff else (peer or "")
            headers.setdefault("X-Forwarded-Proto", self.scheme)
            headers.setdefault("X-Forwarded-Host", hin.get("Host", ""))
        else:
            headers["X-Forwarded-For"] = peer or ""
            headers["X-Forwarded-Proto"] = self.scheme
            headers["X-Forwarded-Host"] = hin.get("Host", "")
        headers["X-Request-ID"] = rid
        ex = Exchange(route, request.method, path if self.keep_path else rest, query, headers, request_id=rid, started=started,
                      max_body=route.max_body, target=raw, body_length=length,
                      tenant=hin.get(route.tenant_header), client_ip=peer,
                      deadline=started + route.total_timeout if route.total_timeout else None)
        if request.body_exists:
            overflow = BodyOverflow()
            ex.vars["_overflow"] = overflow
            ex.body = _counted(request.content, route.max_body, overflow)
        return route, ex

    async def _send(self, request: BaseRequest, resp: ProxyResponse, ex: Exchange | None,
                    rid: str) -> tuple[web.StreamResponse, str | None]:
        """Stream ``resp`` to the client; returns the response and an error code
        when the upstream failed after the status line was sent."""
        headers = resp.headers
        if ex is not None and ex.response_headers:
            for k, v in ex.response_headers:
                headers[k] = v
        headers["X-Request-ID"] = rid
        out = ProxyStreamResponse(status=resp.status, reason=resp.reason, headers=headers)
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
