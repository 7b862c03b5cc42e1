"""Upstreams: one pooled aiohttp client per upstream origin and TLS setting.

Pools are kept by the runtime across reloads (a reload that keeps an upstream
keeps its warm connections). Redirects are never followed: a 3xx goes back to
the service, so injected credentials never reach another host.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
from yarl import URL

from .chain import Exchange, ProxyResponse
from .errors import (RequestBodyTooLarge, UpstreamBadResponse, UpstreamTimeout, UpstreamTLSError,
                     UpstreamUnavailable)
from .http import authority, strip_hop_by_hop

if TYPE_CHECKING:
    from .config import TLS, Limits, Timeouts

# aiohttp adds these when absent; a proxy forwards what the client sent, no more.
_SKIP_AUTO = frozenset({"Accept-Encoding", "User-Agent", "Accept", "Content-Type"})


def make_ssl_context(tls: "TLS") -> ssl.SSLContext | bool:
    """Verification on by default against the system store (SSL_CERT_FILE honoured)."""
    if not tls.verify:
        return False
    ctx = ssl.create_default_context(cafile=tls.ca_bundle)
    return ctx


class BodyOverflow:
    """Set by the streaming request body when it passes the route's limit."""

    __slots__ = ("hit",)

    def __init__(self) -> None:
        self.hit = False


class Upstream:
    """One upstream base URL: where a route's requests go."""

    def __init__(self, url: str, session: aiohttp.ClientSession, timeouts: "Timeouts",
                 limits: "Limits") -> None:
        u = URL(url)
        self.url = url
        self.scheme = u.scheme
        self.host = u.host or ""
        self.port = u.port
        self.origin = str(u.origin())
        self.base_path = u.raw_path.rstrip("/")
        self.authority = authority(u.raw_host or "", u.port, u.scheme)
        self.session = session
        self.timeouts = timeouts
        self.pool_key: tuple[str, bool, str | None] = ("", True, None)  # set by UpstreamPools.get
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect,
                                              sock_read=timeouts.idle or None)
        # The route's [limits] bound the response head (issue 11, item 1).
        # aiohttp bounds each line and the count; the total is checked once
        # the head is in (at most max_headers lines of max_header_size).
        self.max_head = limits.max_header_size
        self.max_headers = limits.max_headers

    def target(self, ex: Exchange) -> URL:
        raw = self.base_path + ex.path
        if ex.query:
            raw += "?" + ex.query
        return URL(self.origin + raw, encoded=True)

    async def send(self, ex: Exchange) -> ProxyResponse:
        """Send the exchange's request; the response body is left streaming."""
        headers = ex.headers
        headers["Host"] = self.authority
        body = ex.body
        if isinstance(body, bytes | bytearray):
            if body or "Content-Length" in headers:
                headers["Content-Length"] = str(len(body))
        timeout = self._timeout
        if ex.deadline is not None:
            remaining = ex.deadline - time.monotonic()
            if remaining <= 0:
                raise UpstreamTimeout()
            timeout = aiohttp.ClientTimeout(total=remaining, sock_connect=self.timeouts.connect,
                                            sock_read=self.timeouts.idle or None)
        overflow = ex.vars.get("_overflow")
        try:
            resp = await self.session._request(
                ex.method, self.target(ex), headers=headers, data=body,
                allow_redirects=False, skip_auto_headers=_SKIP_AUTO, timeout=timeout,
                compress=None, chunked=None, max_line_size=self.max_head,
                max_field_size=self.max_head, max_headers=self.max_headers,
            )
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            if overflow is not None and overflow.hit:
                raise RequestBodyTooLarge() from None
            raise map_client_error(e, self) from None
        size = 0
        for k, v in resp.raw_headers:
            size += len(k) + len(v) + 4
        if size > self.max_head:
            resp.close()
            raise UpstreamBadResponse(f"upstream {self.host}:{self.port}: response head larger than "
                                      f"{self.max_head} bytes")
        return ProxyResponse(resp.status, strip_hop_by_hop(resp.headers),
                             _stream(resp, self), reason=resp.reason,
                             release=lambda ok: resp.release() if ok else resp.close(),
                             upstream=True)


async def _stream(resp: aiohttp.ClientResponse, up: Upstream) -> AsyncIterator[bytes]:
    content = resp.content
    try:
        while True:
            chunk = await content.readany()
            if not chunk:
                break
            yield chunk
    except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as e:
        resp.close()
        raise map_client_error(e, up) from None
    resp.release()


def map_client_error(e: BaseException, up: Upstream) -> Exception:
    where = f"{up.host}:{up.port}"
    if isinstance(e, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamTimeout(f"upstream {where} did not answer in time")
    if isinstance(e, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError, ssl.SSLError)):
        return UpstreamTLSError(f"TLS with upstream {where} failed: certificate or handshake error")
    if isinstance(e, aiohttp.ClientConnectorError):
        return UpstreamUnavailable(f"cannot connect to upstream {where}")
    if isinstance(e, aiohttp.ClientResponseError):
        # The response head did not parse or passed max_header_size/max_headers.
        return UpstreamBadResponse(f"upstream {where} sent a malformed or oversized response head")
    if isinstance(e, (aiohttp.ClientError, OSError)):
        return UpstreamUnavailable(f"upstream {where} closed or reset the connection")
    return UpstreamUnavailable(f"upstream {where} failed ({type(e).__name__})")


class UpstreamPools:
    """Upstream clients by (origin, TLS settings), kept across reloads.

    ``client = "fast"`` (the default) hands out proxy.fastclient upstreams;
    ``"aiohttp"`` keeps one ClientSession per origin.
    """

    def __init__(self, pool_size: int, idle_timeout: float, client: str = "fast",
                 limits: "Limits | None" = None) -> None:
        self._sessions: dict[tuple[str, bool, str | None], aiohttp.ClientSession] = {}
        self.pool_size = pool_size
        self.idle_timeout = idle_timeout
        self.client = client
        # Head limits for upstreams asked for without a route's own [limits].
        if limits is None:
            from .config import Limits
            limits = Limits()
        self.limits = limits
        self.fast = None
        if client == "fast":
            from .fastclient import FastPools

            self.fast = FastPools(pool_size, idle_timeout)

    def stats(self) -> dict[str, dict[str, int]]:
        """Connections per origin (fast client only): open, idle, in_use, created."""
        return self.fast.pools() if self.fast is not None else {}

    def get(self, url: str, tls: "TLS", timeouts: "Timeouts", limits: "Limits | None" = None) -> "Upstream":
        """The upstream for ``url``; its ``pool_key`` names the pool it shares.
        ``limits`` (the route's) bound the upstream's response head."""
        limits = limits or self.limits
        origin = str(URL(url).origin())
        key = (origin, tls.verify, tls.ca_bundle)
        if self.fast is not None:
            fast = self.fast.get(url, tls, timeouts, limits)
            fast.pool_key = key
            return fast  # type: ignore[return-value]
        session = self._sessions.get(key)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.pool_size, limit_per_host=self.pool_size,
                keepalive_timeout=self.idle_timeout, ssl=make_ssl_context(tls),
                enable_cleanup_closed=False, ttl_dns_cache=60,
            )
            session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=_SKIP_AUTO, trust_env=False, timeout=aiohttp.ClientTimeout(total=None),
            )
            # aiohttp resends an idempotent request once, silently, when the
            # connection drops; retries belong to the retry plugin (its policy,
            # budget and deadline), so a request is sent once per try.
            session._retry_connection = False
            self._sessions[key] = session
        up = Upstream(url, session, timeouts, limits)
        up.pool_key = key
        return up

    def retain(self, keep: set[tuple[str, bool, str | None] | None]) -> list[Any]:
        """Forget pools no route uses any more (by ``pool_key``); returns them
        for ``close_one`` once in-flight requests had time to finish."""
        if self.fast is not None:
            return self.fast.retain(keep)
        gone = [s for k, s in self._sessions.items() if k not in keep]
        self._sessions = {k: s for k, s in self._sessions.items() if k in keep}
        return gone

    async def close_one(self, pool: Any) -> None:
        """Close a pool ``retain`` returned (a fast-client Pool or a ClientSession)."""
        if isinstance(pool, aiohttp.ClientSession):
            await pool.close()
        else:
            pool.close()

    async def close(self) -> None:
        if self.fast is not None:
            await self.fast.close()
        for s in self._sessions.values():
            await s.close()
        self._sessions.clear()
