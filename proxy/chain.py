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

A filter whose common path never awaits says so with ``sync = True`` and
the synchronous form instead (docs/performance.md, "Synchronous filters")::

    def before(self, ex):        # None: go on; a ProxyResponse: answer it;
        ...                      # Defer(fn): run fn(ex, call_next) for this request
    def after(self, ex, resp):   # on the response (headers arrived), inner to outer;
        ...                      # None, or Again(fn): fn(ex, resp, call_next) answers instead
    def after_error(self, ex, exc):   # an inner layer raised exc (re-raised after);
        ...                           # None, or Again(fn) as for after (a retry)

``compile_chain`` fuses consecutive sync filters into one layer, so a route
whose filters are all sync and have no ``after`` costs no coroutine of its
own (the terminal's only), and one for the whole group otherwise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

from .body import read_limited
from .errors import RequestBodyTooLarge, SidecarError, error_body

if TYPE_CHECKING:
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

    @classmethod
    def error(cls, err: SidecarError, request_id: str | None) -> "ProxyResponse":
        """The one JSON error response of the sidecar (every listener, every
        plugin): ``{"error": {...}}`` with ``X-Sidecar-Error`` and the error's
        own headers (``Retry-After``, ``Allow``...)."""
        headers = CIMultiDict({"Content-Type": "application/json", "X-Sidecar-Error": err.code})
        headers.update(err.headers)
        return cls(err.status, headers, error_body(err.code, err.message, request_id))

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

    # The header API of Exchange, for the response (the fast client's
    # RawResponse implements it on the upstream's header bytes).

    def has_header(self, name: str) -> bool:
        """Whether the response has a ``name`` header (``name in headers``)."""
        return name in self.headers

    def set_header(self, name: str, value: str) -> None:
        """``headers[name] = value`` (see Exchange.set_header)."""
        self.headers[name] = value

    def remove_header(self, name: str) -> None:
        """Remove every ``name`` header (``headers.popall(name, None)``)."""
        self.headers.popall(name, None)

    def rename_header(self, old: str, new: str) -> None:
        """Every ``old`` header becomes a ``new`` one, appended last (see Exchange.rename_header)."""
        h = self.headers
        values = h.getall(old, ())
        if values:
            del h[old]
            h.extend([(new, v) for v in values])

    async def read(self, limit: int | None = None) -> bytes:
        """Buffer the whole body (for filters that need it, such as a cache).

        Raises ValueError past ``limit``; the response is closed then.
        """
        body = self.body
        if body is None or isinstance(body, bytes | bytearray):
            return bytes(body or b"")
        try:
            data = await read_limited(body, limit, lambda: ValueError("response body larger than the limit"))
        except BaseException:
            self.close()
            raise
        self.body = data
        self.done()
        return data


class Exchange:
    """One proxied request as filters see it, whatever listener it came in on.

    Filters change the upstream request by editing ``method``, ``path``
    (after the route prefix, starting with '/'), ``query`` (raw, no '?'),
    ``headers`` (already free of hop-by-hop headers) and ``body``.
    ``target`` is the request target as the client sent it (route prefix and
    query included).
    A filter that only tests, sets, removes or renames request headers uses
    ``has_header`` / ``set_header`` / ``remove_header`` / ``rename_header``
    (and ``save_headers`` / ``restore_headers`` to send a request again)
    rather than ``headers``: same result, but on the fast server the request
    head then stays bytes (proxy/rawexchange.py) instead of becoming a
    CIMultiDict and being serialised again (~3-5 µs per request).
    ``response_headers`` are added to whatever response reaches the client,
    errors included (rate-limit headers, for instance). ``log`` collects what
    each plugin decided, for the access-log line. A filter that needs another
    request (a background revalidation, a sub-request) makes it with
    ``derive(...)``.
    """

    __slots__ = ("route", "method", "path", "query", "headers", "body", "target",
                 "body_length", "tenant", "request_id", "client_ip", "started", "deadline",
                 "response_headers", "log", "attempt", "vars", "_max_body")

    def __init__(self, route: "Route", method: str, path: str, query: str,
                 headers: CIMultiDict[str], body: Body = None, *, request_id: str,
                 started: float, max_body: int, target: str | None = None,
                 body_length: int | None = None, tenant: str | None = None,
                 client_ip: str | None = None, deadline: float | None = None) -> None:
        self.route = route
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.target = (path + "?" + query if query else path) if target is None else target
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

    def derive(self, **changes: Any) -> "Exchange":
        """A new exchange for the same route and client: the request's identity
        (route, request id, client, tenant, deadline) is kept, every keyword
        given replaces that field (``method``, ``path``, ``query``, ``headers``,
        ``body``, ``started``...); ``headers`` is copied when not given, the
        body is None, and the log, vars and response headers start empty."""
        kw: dict[str, Any] = {
            "route": self.route, "method": self.method, "path": self.path, "query": self.query,
            "headers": CIMultiDict(self.headers), "body": None, "request_id": self.request_id,
            "started": self.started, "max_body": self._max_body, "target": self.target,
            "body_length": None, "tenant": self.tenant, "client_ip": self.client_ip,
            "deadline": self.deadline,
        }
        unknown = changes.keys() - kw.keys()
        if unknown:
            raise TypeError(f"Exchange.derive: unknown field(s) {', '.join(sorted(unknown))}")
        kw.update(changes)
        return Exchange(**kw)

    # Request header edits. Names are case-insensitive; the semantics are
    # those of the CIMultiDict operations named, whatever holds the headers.

    def has_header(self, name: str) -> bool:
        """Whether the request has a ``name`` header (``name in headers``)."""
        return name in self.headers

    def set_header(self, name: str, value: str) -> None:
        """``headers[name] = value``: the first ``name`` header takes the
        value (and this spelling of the name) where it stands, the others are
        removed; appended last when there was none."""
        self.headers[name] = value

    def remove_header(self, name: str) -> None:
        """Remove every ``name`` header (``headers.popall(name, None)``)."""
        self.headers.popall(name, None)

    def rename_header(self, old: str, new: str) -> None:
        """Every ``old`` header becomes a ``new`` one, appended last in their
        order (``getall(old)``, ``del headers[old]``, ``add(new, v)`` each)."""
        h = self.headers
        values = h.getall(old, ())
        if values:
            del h[old]
            h.extend([(new, v) for v in values])

    def save_headers(self) -> Any:
        """A snapshot of the request headers, for ``restore_headers`` (a
        filter that sends the request again, such as retry, first undoes
        what the inner filters changed)."""
        return self.headers.copy()

    def restore_headers(self, saved: Any) -> None:
        """Put back the headers as ``save_headers`` saw them (the snapshot
        stays usable for another restore)."""
        self.headers = saved.copy()

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
        data = await read_limited(body, cap, RequestBodyTooLarge)
        self.body = data
        return data


Handler = Callable[[Exchange], Awaitable[ProxyResponse]]


class Defer:
    """What a sync filter's ``before`` returns when this request needs the
    asynchronous path (a queue wait, a sampled span, a half-open trial):
    the fused layer then awaits ``run(ex, call_next)``, where ``call_next``
    is the rest of the chain after this filter. ``run`` owns the request
    from there, as ``handle`` would (the filter's ``after`` hooks are not
    called for it)."""

    __slots__ = ("run",)

    def __init__(self, run: Callable[[Exchange, Handler], Awaitable[ProxyResponse]]) -> None:
        self.run = run


class Again:
    """What a sync filter's ``after`` or ``after_error`` returns when this
    request must go through the rest of the chain again (a retry): the fused
    layer then awaits ``run(ex, outcome, call_next)``, where ``outcome`` is
    the response (or the exception) that came back and ``call_next`` the rest
    of the chain after this filter; what ``run`` returns or raises is what the
    filters outside this one see. A response ``run`` does not return is its
    to close."""

    __slots__ = ("run",)

    def __init__(self, run: Callable[[Exchange, Any, Handler], Awaitable[ProxyResponse]]) -> None:
        self.run = run


class Filter:
    """Base class for a route's filter. Subclasses override ``handle``, or
    set ``sync = True`` and override ``before`` / ``after`` / ``after_error``.

    A filter instance belongs to one route and lives until that route's
    config for this plugin changes (state such as buckets or a breaker lives
    on it, and survives reloads that leave its config unchanged).
    An instance may set ``before``, ``after`` or ``after_error`` to None when
    its config needs no such step (the chain then skips it entirely).
    """

    #: Set by the chain compiler to the plugin's name.
    name: str = ""
    #: The common path is before/after: no coroutine layer of its own.
    sync: bool = False

    def before(self, ex: Exchange) -> "ProxyResponse | Defer | None":
        return None

    def after(self, ex: Exchange, resp: ProxyResponse) -> "Again | None":
        return None

    def after_error(self, ex: Exchange, exc: BaseException) -> "Again | None":
        return None

    async def handle(self, ex: Exchange, call_next: Handler) -> ProxyResponse:
        # The sync form as one onion layer (a filter used outside a compiled
        # chain, or a test calling it directly): same semantics as the fused layer.
        return await _fuse([self], call_next)(ex)

    async def close(self) -> None:
        """Release what the filter holds; called when a reload drops it."""

    def describe(self) -> dict[str, Any]:
        """What /admin/routes shows for this filter."""
        return {}


def compile_chain(filters: list[Filter], terminal: Handler) -> Handler:
    """Nest the filters (first = outermost) around the terminal handler, once.

    Runs of consecutive ``sync`` filters become one fused layer each."""
    handler = terminal
    group: list[Filter] = []
    for f in reversed(filters):
        if f.sync:
            group.insert(0, f)
            continue
        handler = _bind(f.handle, _fuse(group, handler))
        group = []
    return _fuse(group, handler)


def _bind(handle: Callable[[Exchange, Handler], Awaitable[ProxyResponse]], nxt: Handler) -> Handler:
    # A plain function returning the filter's coroutine, not a coroutine of
    # its own: no extra coroutine object per layer per request, and no extra
    # frame for every resumption to pass through (docs/performance.md).
    def call(ex: Exchange) -> Awaitable[ProxyResponse]:
        return handle(ex, nxt)

    return call


def _hook(f: Filter, name: str) -> Callable[..., Any] | None:
    """The filter's ``name`` step, or None when it has none (not overridden,
    or set to None on the instance)."""
    m = getattr(f, name, None)
    if m is None or getattr(m, "__func__", None) is getattr(Filter, name):
        return None
    return m


async def _answer(resp: ProxyResponse) -> ProxyResponse:
    return resp


async def _raise(exc: BaseException) -> ProxyResponse:
    raise exc


async def _settle(x: Any, original: BaseException) -> ProxyResponse:
    """What ``errored`` gave for ``original``: raised (as itself when it is
    ``original``, so its traceback stays), or awaited when an Again answered."""
    if isinstance(x, BaseException):
        if x is original:
            raise original
        raise x from None
    return await x


async def _settled(x: Any) -> ProxyResponse:
    """What ``unwind``/``after_all`` gave: the response, or the awaitable of one."""
    return x if isinstance(x, ProxyResponse) else await x


class Fused:
    """A run of sync filters fused around ``nxt``: ``call`` is the chain
    layer; the fast server's express path (proxy/fastserver/express.py) runs
    the same pieces from protocol callbacks, without a coroutine:

    - ``steps``: the befores, ``(position, before)``, outer to inner;
    - ``slow(ex, i, r)``: the awaitable continuing after the before at ``i``
      answered ``r`` (not None), exactly as ``call`` would;
    - ``errored(entered, ex, exc)``: the filters that passed their before
      see ``exc`` inner to outer; returns the exception to raise;
    - ``after_all(ex, resp)``: every filter passed and ``resp`` came back:
      the afters inner to outer (raises, the response closed, when one does);
    - ``around_all(ex, aw)``: the same around an awaitable of the response.
    """

    __slots__ = ("n", "steps", "slow", "errored", "after_all", "around_all", "call", "unwinds")

    def __init__(self, n: int, steps: tuple[tuple[int, Callable[[Exchange], Any]], ...],
                 slow: Callable[[Exchange, int, Any], Awaitable[ProxyResponse]],
                 errored: Callable[[int, Exchange, BaseException], BaseException],
                 after_all: Callable[[Exchange, ProxyResponse], ProxyResponse],
                 around_all: Callable[..., Awaitable[ProxyResponse]],
                 call: Handler, unwinds: bool) -> None:
        self.n = n
        self.steps = steps
        self.slow = slow
        self.errored = errored
        self.after_all = after_all
        self.around_all = around_all
        self.call = call
        self.unwinds = unwinds


def _fuse(group: list[Filter], nxt: Handler) -> Handler:
    """One layer for a run of sync filters around ``nxt`` (``Fused.call``)."""
    return fuse(group, nxt).call if group else nxt


def fuse(group: list[Filter], nxt: Handler) -> Fused:
    """Fuse a run of sync filters around ``nxt``.

    Semantics are those of nesting each filter's ``handle`` (the onion):
    befores run outer to inner; a filter answering early (ProxyResponse or
    an exception) skips the inner filters and ``nxt``, and only the filters
    outside it see the response (``after``) or the exception
    (``after_error``); afters run inner to outer; an ``after`` that raises
    closes the response and the filters outside it see that exception.
    """
    n = len(group)
    befores = [_hook(f, "before") for f in group]
    afters = [_hook(f, "after") for f in group]
    errors = [_hook(f, "after_error") for f in group]
    steps = tuple((i, b) for i, b in enumerate(befores) if b is not None)
    unwinds = any(afters) or any(errors)
    # What a Defer or an Again at position i continues with: the rest of the group, then nxt.
    rests = [_fuse(group[i + 1:], nxt) for i in range(n)]
    afters_rev = tuple((j, a) for j, a in reversed(list(enumerate(afters))) if a is not None)
    names = [f.name or type(f).__name__ for f in group]

    def errored(entered: int, ex: Exchange, exc: BaseException) -> Any:
        # The filters 0..entered-1 passed their before: they see the error,
        # inner to outer; a handler that raises replaces it (as in the onion).
        # Returns the exception to raise, or, when a filter's after_error
        # answered Again, the awaitable of the response that replaces it.
        for j in range(entered - 1, -1, -1):
            h = errors[j]
            if h is not None:
                try:
                    r = h(ex, exc)
                except BaseException as e:  # noqa: BLE001 - re-raised by the caller
                    exc = e
                    continue
                if r is not None:
                    return again(j, ex, r, exc)
        return exc

    async def again(j: int, ex: Exchange, r: Any, outcome: Any) -> ProxyResponse:
        # Filter j's after or after_error answered Again: its run takes the
        # rest of the chain after it; the filters outside it (0..j-1) then see
        # what that gives, as they would have seen the first outcome.
        if not isinstance(r, Again):
            raise TypeError(f"filter {names[j]}: after() or after_error() returned {type(r).__name__}, "
                            "not None or an Again")
        try:
            resp = await r.run(ex, outcome, rests[j])
        except BaseException as e:
            return await _settle(errored(j, ex, e), e)
        return await _settled(unwind(j, ex, resp))

    def unwind(entered: int, ex: Exchange, resp: ProxyResponse) -> Any:
        # The afters of the filters 0..entered-1, inner to outer: the
        # response, or the awaitable of the one an Again gives.
        for j, a in afters_rev:
            if j >= entered:
                continue
            try:
                r = a(ex, resp)
            except BaseException as e:
                resp.close()
                x = errored(j, ex, e)
                if isinstance(x, BaseException):
                    raise x from None
                return x
            if r is not None:
                return again(j, ex, r, resp)
        return resp

    async def around(entered: int, ex: Exchange, run: Handler) -> ProxyResponse:
        try:
            resp = await run(ex)
        except BaseException as e:
            return await _settle(errored(entered, ex, e), e)
        return await _settled(unwind(entered, ex, resp))

    async def slow(ex: Exchange, i: int, r: Any) -> ProxyResponse:
        # Position i's before answered r (not None); 0..i-1 passed.
        while True:
            if isinstance(r, ProxyResponse):
                return await _settled(unwind(i, ex, r))
            if isinstance(r, Defer):
                # Awaited before the loop moves on, so the lambda sees this i and r.
                return await around(i, ex, lambda x: r.run(x, rests[i]))  # noqa: B023
            if r is not None:
                raise TypeError(f"filter {names[i]}: before() returned {type(r).__name__}, "
                                "not None, a ProxyResponse or a Defer")
            i += 1
            while i < n and befores[i] is None:
                i += 1
            if i == n:
                return await around(n, ex, nxt)
            try:
                r = befores[i](ex)  # type: ignore[misc]
            except BaseException as e:
                return await _settle(errored(i, ex, e), e)

    def after_all(ex: Exchange, resp: ProxyResponse) -> Any:
        # The common case, every filter passed.
        return unwind(n, ex, resp)

    async def around_all(ex: Exchange, aw: Awaitable[ProxyResponse] | None = None) -> ProxyResponse:
        try:
            resp = await (nxt(ex) if aw is None else aw)
        except BaseException as e:
            return await _settle(errored(n, ex, e), e)
        return await _settled(after_all(ex, resp))

    def call(ex: Exchange) -> Awaitable[ProxyResponse]:
        i = 0
        try:
            for i, b in steps:
                r = b(ex)
                if r is not None:
                    if r.__class__ is ProxyResponse and not unwinds:
                        return _answer(r)
                    return slow(ex, i, r)
        except BaseException as e:
            x = errored(i, ex, e)
            return _raise(x) if isinstance(x, BaseException) else x
        if unwinds:
            return around_all(ex)
        return nxt(ex)

    return Fused(n=n, steps=steps, slow=slow, errored=errored, after_all=after_all, around_all=around_all,
                 call=call, unwinds=unwinds)
