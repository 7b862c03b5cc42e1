"""FastUpstream.send: one request over a pooled connection (the Upstream contract)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from yarl import URL

from ..chain import Exchange, ProxyResponse
from ..errors import RequestBodyTooLarge, SidecarError, UpstreamTimeout, UpstreamUnavailable
from .conn import Conn, _Failed, _Lease, _map

if TYPE_CHECKING:
    from ..config import Timeouts
    from .pool import Pool

# RFC 9110 9.2.2: methods a proxy may repeat after a reset without changing
# what the upstream did (POST/PATCH are not; they are retried only when the
# request provably never left).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# aiohttp sends "Content-Length: 0" on bodiless requests of other methods; so do we.
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class FastUpstream:
    """One upstream base URL on the fast client (same contract as upstream.Upstream)."""

    def __init__(self, url: str, pool: Pool, timeouts: "Timeouts", max_head: int = 64 * 1024,
                 max_headers: int = 100) -> None:
        u = URL(url)
        self.url = url
        self.scheme = u.scheme
        self.host = u.host or ""
        self.port = u.port
        self.base_path = u.raw_path.rstrip("/")
        default_port = 443 if u.scheme == "https" else 80
        self.authority = u.raw_host if u.port == default_port else f"{u.raw_host}:{u.port}"
        self.pool = pool
        self.timeouts = timeouts
        self._connect = timeouts.connect
        self._idle = timeouts.idle or None
        # The route's [limits] bound the response head as they bound the
        # request's (issue 11, item 1).
        self._max_head = max_head
        self._max_headers = max_headers

    async def send(self, ex: Exchange) -> ProxyResponse:
        """Send the exchange's request; the response body is left streaming."""
        headers = ex.headers
        headers["Host"] = self.authority
        body = ex.body
        method = ex.method
        stream = None
        if body is None:
            payload = b""
            if method not in _NO_BODY_METHODS and "Content-Length" not in headers \
                    and "Transfer-Encoding" not in headers:
                headers["Content-Length"] = "0"
        elif isinstance(body, bytes | bytearray):
            payload = bytes(body)
            if payload or "Content-Length" in headers or method not in _NO_BODY_METHODS:
                headers["Content-Length"] = str(len(payload))
        else:
            payload = b""
            stream = body
            if "Content-Length" not in headers:
                headers["Transfer-Encoding"] = "chunked"
        target = self.base_path + ex.path
        if ex.query:
            target += "?" + ex.query
        lines = [f"{method} {target} HTTP/1.1"]
        lines.extend([f"{k}: {v}" for k, v in headers.items()])
        lines.append("\r\n")
        head = "\r\n".join(lines)
        # SECURITY: CR or LF inside a method, target, name or value would split
        # the request (CWE-113); every line must end exactly where we ended it.
        n = len(lines)
        if head.count("\n") != n or head.count("\r") != n:
            raise UpstreamUnavailable("request header contains a line break; not sent")
        data = head.encode("utf-8", "surrogateescape")
        deadline = ex.deadline
        if deadline is not None and deadline - time.monotonic() <= 0:
            raise UpstreamTimeout()
        head_req = method == "HEAD"
        chunked = stream is not None and "Transfer-Encoding" in headers
        replayable = stream is None
        pool = self.pool
        fresh = False
        while True:
            try:
                conn = await pool.acquire(self._connect, deadline, fresh)
            except _Failed as e:
                raise _map(e, pool) from None
            reused = conn.requests > 0
            conn.begin(head_req, self._idle, deadline, self._max_head, self._max_headers)
            pump = None
            try:
                conn.transport.write(data + payload if payload else data)  # type: ignore[union-attr]
                if stream is not None:
                    pump = asyncio.ensure_future(self._pump(conn, stream, chunked))
                    await self._wait_head_or_pump(conn, pump)
                else:
                    await conn.wait_head()
            except _Failed as e:
                conn.close()
                if pump is not None:
                    await self._cancel_pump(pump)
                # A reused keep-alive connection the upstream had already
                # closed (nginx after keepalive_requests or its idle timeout):
                # retry once on a fresh one when repeating it is safe.
                if (reused and not fresh and replayable and e.kind == "reset" and e.got_nothing
                        and method in IDEMPOTENT):
                    fresh = True
                    continue
                raise _map(e, pool) from None
            except RequestBodyTooLarge:
                conn.close()
                raise
            except BaseException:
                conn.close()
                if pump is not None and not pump.done():
                    pump.cancel()
                raise
            break
        if pump is not None and not pump.done():
            # The upstream answered before the whole body was sent (an early
            # 413, 401...): the connection is mid-request, so it cannot be reused.
            pump.cancel()
            conn._poisoned = True
        status = conn._status
        resp_headers = conn.response_headers()
        whole = conn.take_body()
        if whole is not None:
            conn.release(True)
            return ProxyResponse(status, resp_headers, whole, reason=conn._reason, upstream=True)
        lease = _Lease(conn)
        return ProxyResponse(status, resp_headers, lease, reason=conn._reason,
                             release=lease.release, upstream=True)

    async def _wait_head_or_pump(self, conn: Conn, pump: asyncio.Future) -> None:
        head = asyncio.ensure_future(conn.wait_head())
        try:
            done, _ = await asyncio.wait((head, pump), return_when=asyncio.FIRST_COMPLETED)
            if head in done:
                head.result()
                return
            exc = pump.exception()
            if isinstance(exc, SidecarError | _Failed):
                raise exc
            if exc is not None:
                # The client's body stream broke (the client went away mid-upload).
                raise _Failed("protocol", "the request body stream failed") from None
            await head
        finally:
            if not head.done():
                head.cancel()
                try:
                    await head
                except BaseException:
                    pass

    @staticmethod
    async def _cancel_pump(pump: asyncio.Future) -> None:
        if pump.done():
            if not pump.cancelled():
                e = pump.exception()
                if isinstance(e, RequestBodyTooLarge):
                    raise e
            return
        pump.cancel()

    @staticmethod
    async def _pump(conn: Conn, stream: AsyncIterator[bytes], chunked: bool) -> None:
        """Copy the request body upstream, waiting whenever the socket buffer is full."""
        write = conn.transport.write  # type: ignore[union-attr]
        async for chunk in stream:
            if conn.closed:
                raise conn._error or _Failed("reset", "upstream closed the connection", got_nothing=True)
            if not chunk:
                continue
            write(_chunked(chunk) if chunked else chunk)
            if conn._paused_writing:
                await conn.drain()
        if chunked and not conn.closed:
            write(b"0\r\n\r\n")
