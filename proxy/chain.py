"""The per-request pieces: Exchange, ProxyResponse, Filter, and chain compilation.

A route's filters are compiled once (at load time) into nested closures, the
way Starlette's ``build_middleware_stack`` and Envoy's filter factories do, so
a request runs ``await route.handler(ex)`` and nothing else is looked up.

A filter is an onion layer::

    async def handle(self, ex, call_next):
        ...                          # before: may change ex or answer itself
        resp = await call_next(ex)   # the rest of the chain and the upstream
        ...                          # after: may change status, headers, body
        return resp

``call_next`` raises SidecarError subclasses (UpstreamUnavailable,
UpstreamTimeout...) when the upstream fails; a filter may catch them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

from .errors import RequestBodyTooLarge

if TYPE_CHECKING:
    from aiohttp.web import BaseRequest

    from .routes import Route

Body = bytes | AsyncIterator[bytes] | None


class ProxyResponse:
    """A response on its way to the client: from the upstream or made by a filter.

    ``body`` is bytes or an async iterator of chunks (streamed, not buffered).
    ``release`` returns an upstream connection to its pool or closes it; a
    filter that drops a response (a retry, a cache hit) must call ``close``.
    """

    __slots__ = ("status", "reason", "headers", "body", "_release", "upstream")

    def __init__(self, status: int, headers: CIMultiDict[str] | None = None, body: Body = b"",
                 *, reason: str | None = None,
                 release: Callable[[bool], None] | None = None, upstream: bool = False) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers if headers is not None else CIMultiDict()
        self.body = body
        self._release = release
        # True when the response came from the upstream (not made by the sidecar).
        self.upstream = upstream

    def close(self) -> None:
        """Drop the response: the upstream connection is closed, not reused."""
        if self._release is not None:
            rel, self._release = self._release, None
            rel(False)

    def done(self) -> None:
        """The body was read to the end: the connection may be reused."""
        if self._release is not None:
            rel, self._release = self._release, None
            rel(True)

    async def read(self, limit: int | None = None) -> bytes:
        """Buffer the whole body (for filters that need it, such as a cache).

        Raises ValueError past ``limit``; the response is closed then.
        """
        body = self.body
        if body is None or isinstance(body, bytes | bytearray):
            return bytes(body or b"")
        try:
            data = await collect(body, limit, lambda: ValueError("response body larger than the limit"))
        except BaseException:
            self.close()
            raise
        self.body = data
        self.done()
        return data


async def collect(body: AsyncIterator[bytes], limit: int | None,
                  too_large: Callable[[], Exception]) -> bytes:
    """Join a streamed body, raising ``too_large()`` once it passes ``limit``."""
    parts = []
    size = 0
    async for chunk in body:
        size += len(chunk)
        if limit is not None and size > limit:
            raise too_large()
        parts.append(chunk)
    return b"".join(parts)


class Exchange:
    """One proxied request as filters see it.

    Filters change the upstream request by editing ``method``, ``path``
    (after the route prefix, starting with '/'), ``query`` (raw, no '?'),
    ``headers`` (already free of hop-by-hop headers) and ``body``.
    ``response_headers`` are added to whatever response reaches the client,
    errors included (rate-limit headers, for instance). ``log`` collects what
    each plugin decided, for the access-log line.
    """

    __slots__ = ("request", "route", "method", "path", "query", "headers", "body",
                 "body_length", "tenant", "request_id", "client_ip", "started", "deadline",
                 "response_headers", "log", "attempt", "vars", "_max_body")

    def __init__(self, request: "BaseRequest", route: "Route", method: str, path: str, query: str,
                 headers: CIMultiDict[str], body: Body, body_length: int | None, tenant: str | None,
                 request_id: str, client_ip: str | None, started: float, deadline: float | None,
                 max_body: int) -> None:
        self.request = request
        self.route = route
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        # Declared Content-Length (None for chunked or unknown).
        self.body_length = body_length
        self.tenant = tenant
        self.request_id = request_id
        self.client_ip = client_ip
        self.started = started
        # time.monotonic() by which the whole exchange must finish (None: no deadline).
        self.deadline = deadline
        self.response_headers: list[tuple[str, str]] = []
        self.log: dict[str, Any] = {}
        self.attempt = 1
        # Free-form per-request values shared between filters, keyed by plugin name.
        self.vars: dict[str, Any] = {}
        self._max_body = max_body

    async def read_body(self, limit: int | None = None) -> bytes:
        """Buffer the request body (once) so it can be inspected or replayed.

        Raises RequestBodyTooLarge past ``limit`` (default: the route's
        ``max_request_body``). Afterwards ``ex.body`` is the bytes.
        """
        body = self.body
        if body is None:
            return b""
        if isinstance(body, bytes | bytearray):
            return bytes(body)
        cap = self._max_body if limit is None else min(limit, self._max_body)
        data = await collect(body, cap, RequestBodyTooLarge)
        self.body = data
        return data


Handler = Callable[[Exchange], Awaitable[ProxyResponse]]


class Filter:
    """Base class for a route's filter. Subclasses override ``handle``.

    A filter instance belongs to one route and lives until that route's
    config for this plugin changes (state such as buckets or a breaker lives
    on it, and survives reloads that leave its config unchanged).
    """

    #: Set by the chain compiler to the plugin's name.
    name: str = ""

    async def handle(self, ex: Exchange, call_next: Handler) -> ProxyResponse:
        return await call_next(ex)

    async def close(self) -> None:
        """Release what the filter holds; called when a reload drops it."""

    def describe(self) -> dict[str, Any]:
        """What /admin/routes shows for this filter."""
        return {}


def compile_chain(filters: list[Filter], terminal: Handler) -> Handler:
    """Nest the filters (first = outermost) around the terminal handler, once."""
    handler = terminal
    for f in reversed(filters):
        handler = _bind(f.handle, handler)
    return handler


def _bind(handle: Callable[[Exchange, Handler], Awaitable[ProxyResponse]], nxt: Handler) -> Handler:
    # A plain function returning the filter's coroutine, not a coroutine of
    # its own: no extra coroutine object per layer per request, and no extra
    # frame for every resumption to pass through (docs/performance.md).
    def call(ex: Exchange) -> Awaitable[ProxyResponse]:
        return handle(ex, nxt)

    return call
