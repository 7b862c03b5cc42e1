"""FastUpstream.send: one request over a pooled connection (the Upstream contract)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING

from yarl import URL

from ..chain import Exchange, ProxyResponse
from ..errors import RequestBodyTooLarge, SidecarError, UpstreamTimeout
from ..http import LAST_CHUNK, authority
from ..http import chunk as http_chunk
from ..rawexchange import RawResponse
from .conn import Conn, _Failed, _Lease, _map
from .request import prepare
from .upgrade import Upgraded, upgrade_headers

if TYPE_CHECKING:
    from ..config import Timeouts
    from .pool import Pool

# RFC 9110 9.2.2: methods a proxy may repeat after a reset without changing
# what the upstream did (POST/PATCH are not; they are retried only when the
# request provably never left).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def retry_fresh(e: _Failed, reused: bool, method: str) -> bool:
    """A reused keep-alive connection the upstream had already closed (nginx
    after keepalive_requests or its idle timeout) failed before any response
    byte: the request is sent again on a fresh connection when repeating it
    is safe (the body must be replayable too)."""
    return reused and e.kind == "reset" and e.got_nothing and method in IDEMPOTENT


class FastUpstream:
    """One upstream base URL on the fast client (same contract as upstream.Upstream)."""

    #: Can hand a 101's connection over (WebSocket passthrough on the fast server).
    upgrades = True

    def __init__(self, url: str, pool: Pool, timeouts: "Timeouts", max_head: int = 64 * 1024,
                 max_headers: int = 100) -> None:
        u = URL(url)
        self.url = url
        self.scheme = u.scheme
        self.host = u.host or ""
        self.port = u.port
        self.base_path = u.raw_path.rstrip("/")
        self.authority = authority(u.raw_host or "", u.port, u.scheme)
        self.pool = pool
        self.timeouts = timeouts
        # (origin, verify, ca_bundle): which pool this is (UpstreamPools.retain).
        self.pool_key: tuple[str, bool, str | None] = ("", True, None)
        self._connect = timeouts.connect
        self._idle = timeouts.idle or None
        # Route-constant header, prebuilt once (issue 10).
        self._host_line = b"Host: " + (self.authority or "").encode("ascii", "surrogateescape") + b"\r\n"
        # The route's [limits] bound the response head as they bound the
        # request's (issue 11, item 1).
        self._max_head = max_head
        self._max_headers = max_headers

    def send(self, ex: Exchange) -> Awaitable[ProxyResponse]:
        """Send the exchange's request; the response body is left streaming.

        A plain function returning the exchange's coroutine: one coroutine
        layer fewer per request (docs/performance.md)."""
        data, payload, stream, chunked = self.prepare(ex)
        return self._exchange(ex, data, payload, stream, chunked)

    def prepare(self, ex: Exchange) -> tuple[bytes, bytes, AsyncIterator[bytes] | None, bool]:
        """The request head, a bytes payload, a body stream, whether it is
        chunked (proxy/fastclient/request.py, compiled with the request path)."""
        return prepare(self.base_path, self._host_line, self.authority, ex)

    async def _exchange(self, ex: Exchange, data: bytes, payload: bytes,
                        stream: AsyncIterator[bytes] | None, chunked: bool, fresh: bool = False) -> ProxyResponse:
        """``fresh``: on a new connection (the express path's pooled one was stale)."""
        method = ex.method
        deadline = ex.deadline
        if deadline is not None and deadline - time.monotonic() <= 0:
            raise UpstreamTimeout()
        head_req = method == "HEAD"
        upgrade = "_websocket" in ex.vars
        replayable = stream is None
        pool = self.pool
        while True:
            try:
                conn = await pool.acquire(self._connect, deadline, fresh)
            except _Failed as e:
                raise _map(e, pool) from None
            reused = conn.requests > 0
            conn.begin(head_req, self._idle, deadline, self._max_head, self._max_headers)
            conn._upgrade = upgrade
            pump = None
            try:
                if stream is None:
                    # With the other request heads of this loop pass (proxy/writebatch.py);
                    # a streamed body is written by the pump, in order, directly.
                    pool.batch.write(conn.transport, data + payload if payload else data)  # type: ignore[arg-type]
                else:
                    conn.transport.write(data)  # type: ignore[union-attr]
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
                if not fresh and replayable and retry_fresh(e, reused, method):
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
        return self.response(conn)

    @staticmethod
    def response(conn: Conn) -> ProxyResponse:
        """The response whose head ``conn`` received (the body whole when it
        already arrived with a Content-Length, else streaming from ``conn``)."""
        status = conn._status
        if status == 101:
            up = Upgraded(conn)
            return ProxyResponse(101, upgrade_headers(conn), up, reason=conn._reason, release=up.close,
                                 upstream=True)
        pairs = conn._fwd
        whole = conn.take_body()
        if whole is not None:
            conn.release(True)
            return RawResponse.new(status, pairs, whole, conn._reason, None)
        lease = _Lease(conn)
        return RawResponse.new(status, pairs, lease, conn._reason, lease.release)

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
            write(http_chunk(chunk) if chunked else chunk)
            if conn._paused_writing:
                await conn.drain()
        if chunked and not conn.closed:
            write(LAST_CHUNK)
