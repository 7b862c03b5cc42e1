"""Keep-alive pools per upstream origin, and the TLS context that resumes sessions."""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import TYPE_CHECKING

from yarl import URL

from ..writebatch import WriteBatch
from .conn import Conn, _Failed
from .send import FastUpstream

if TYPE_CHECKING:
    from ..config import TLS, Limits, Timeouts  # noqa: F401


class Pool:
    """Keep-alive connections to one origin: at most ``limit`` open, idle ones
    closed after ``idle_timeout``; reuse is LIFO (the warmest socket first)."""

    def __init__(self, scheme: str, host: str, port: int, limit: int, idle_timeout: float,
                 ssl_context: "ResumingContext | None") -> None:
        self.host = host
        self.port = port
        self.where = f"{host}:{port}"
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.ssl = ssl_context if scheme == "https" else None
        self.idle: collections.deque[Conn] = collections.deque()
        self.open = 0
        self.connecting = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        # Request heads of one loop pass go out together (proxy/writebatch.py).
        self.batch: WriteBatch = None  # type: ignore[assignment]
        self.closed = False
        self.created = 0  # connections opened over the pool's life (tests and /admin)

    def stats(self) -> dict[str, int]:
        return {"open": self.open, "idle": len(self.idle), "in_use": self.open - len(self.idle),
                "connecting": self.connecting, "waiting": len(self._waiters), "created": self.created}

    def take_idle(self) -> Conn | None:
        """The warmest idle connection that is still usable, or None (no wait)."""
        idle = self.idle
        if idle:
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if conn.closed or conn.transport is None or conn.transport.is_closing():
                    conn.close()  # the upstream closed it while idle: never used, so never sent
                    continue
                if now - conn.idle_since > self.idle_timeout:
                    conn.close()
                    continue
                return conn
        return None

    async def acquire(self, connect_timeout: float, deadline: float | None, fresh: bool = False) -> Conn:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
            self.batch = WriteBatch(self.loop)
        idle = self.idle
        if not fresh:
            conn = self.take_idle()
            if conn is not None:
                return conn
        while self.open + self.connecting >= self.limit:
            if fresh and idle:
                idle.popleft().close()
                continue
            await self._wait_slot(connect_timeout, deadline)
            if not fresh and idle:
                conn = idle.pop()
                if not conn.closed and not conn.transport.is_closing():  # type: ignore[union-attr]
                    return conn
                conn.close()
        return await self._connect(connect_timeout, deadline)

    async def _wait_slot(self, connect_timeout: float, deadline: float | None) -> None:
        wait = connect_timeout
        if deadline is not None:
            wait = min(wait, max(0.0, deadline - time.monotonic()))
        fut = self.loop.create_future()
        self._waiters.append(fut)
        timer = self.loop.call_later(wait, lambda: None if fut.done() else fut.set_exception(
            _Failed("timeout", "no free upstream connection in time")))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Woken for a free slot, then cancelled before running: hand
                # the wake-up to the next waiter instead of losing it.
                self._notify()
            raise
        finally:
            timer.cancel()
            try:
                self._waiters.remove(fut)
            except ValueError:
                pass

    def _notify(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    async def _connect(self, connect_timeout: float, deadline: float | None) -> Conn:
        wait = connect_timeout
        if deadline is not None:
            wait = min(wait, max(0.0, deadline - time.monotonic()))
        self.connecting += 1
        conn = Conn(self)
        try:
            async with asyncio.timeout(wait):
                await self.loop.create_connection(
                    lambda: conn, self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None)
        except (TimeoutError, asyncio.TimeoutError):
            raise _Failed("timeout", "connect timed out") from None
        except ssl.SSLError:
            raise _Failed("tls", "TLS handshake failed") from None
        except OSError:
            raise _Failed("connect", "connect failed") from None
        finally:
            self.connecting -= 1
            if conn.transport is None or conn.closed:
                self._notify()
        if conn.closed:
            raise _Failed("connect", "closed during connect")
        self.open += 1
        self.created += 1
        conn.counted = True
        return conn

    def _put(self, conn: Conn) -> None:
        if self.closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)
        if self._waiters:
            self._notify()
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(max(self.idle_timeout / 2, 0.05), self._sweep)

    def _forget(self, conn: Conn) -> None:
        """A connection closed: free its slot."""
        if not conn.counted:
            return
        conn.counted = False
        self.open -= 1
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        self._notify()

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = time.monotonic() - self.idle_timeout
        idle = self.idle
        while idle and idle[0].idle_since < cutoff:
            idle[0].close()  # close() removes it from the deque
        if idle and not self.closed:
            self._sweeper = self.loop.call_later(max(self.idle_timeout / 2, 0.05), self._sweep)

    def close(self) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self.idle:
            self.idle[0].close()


class FastPools:
    """Fast-client pools by (origin, TLS settings), kept across reloads."""

    def __init__(self, pool_size: int, idle_timeout: float) -> None:
        self._pools: dict[tuple[str, bool, str | None], Pool] = {}
        self.pool_size = pool_size
        self.idle_timeout = idle_timeout

    def get(self, url: str, tls: "TLS", timeouts: "Timeouts", limits: "Limits") -> FastUpstream:
        u = URL(url)
        key = (str(u.origin()), tls.verify, tls.ca_bundle)
        pool = self._pools.get(key)
        if pool is None or pool.closed:
            ctx = None
            if u.scheme == "https":
                ctx = make_client_context(tls)
            pool = Pool(u.scheme, u.host or "", u.port or (443 if u.scheme == "https" else 80),
                        self.pool_size, self.idle_timeout, ctx)
            self._pools[key] = pool
        return FastUpstream(url, pool, timeouts, limits.max_header_size, limits.max_headers)

    def pools(self) -> dict[str, dict[str, int]]:
        return {k[0]: p.stats() for k, p in self._pools.items()}

    def retain(self, keep: set[tuple[str, bool, str | None] | None]) -> list[Pool]:
        gone = [p for k, p in self._pools.items() if k not in keep]
        self._pools = {k: p for k, p in self._pools.items() if k in keep}
        return gone

    async def close(self) -> None:
        for p in self._pools.values():
            p.close()
        self._pools.clear()


class ResumingContext(ssl.SSLContext):
    """An SSLContext that offers the last TLS session it saw for a host.

    asyncio's create_connection has no ``session`` argument, but it builds
    every TLS connection through ``wrap_bio``: filling the argument in here
    gives abbreviated handshakes (RFC 8446 2.2) to new pooled connections.
    """

    sessions: dict[str, ssl.SSLSession]

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None,
                 session=None):
        if session is None and not server_side and server_hostname is not None:
            session = self.sessions.get(server_hostname)
        return super().wrap_bio(incoming, outgoing, server_side=server_side,
                                server_hostname=server_hostname, session=session)

    def remember(self, host: str, transport: asyncio.BaseTransport | None) -> None:
        obj = transport.get_extra_info("ssl_object") if transport is not None else None
        sess = getattr(obj, "session", None)
        if sess is not None:
            self.sessions[host] = sess


def make_client_context(tls: "TLS") -> ResumingContext:
    """Verification and hostname checks on by default (the system store,
    SSL_CERT_FILE honoured, or ``ca_bundle``); ``verify = false`` is an
    explicit opt-out per policy."""
    ctx = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.sessions = {}
    if tls.ca_bundle:
        ctx.load_verify_locations(cafile=tls.ca_bundle)
    else:
        ctx.load_default_certs()
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
