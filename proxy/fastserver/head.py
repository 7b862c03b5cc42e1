"""One parsed request head on the fast server: raw header bytes, looked up on demand."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..http import HOP_BY_HOP
from ..rawexchange import _KEYS, RawExchange, _key

if TYPE_CHECKING:
    from ..routes import Route
    from .body import RequestBody

_HOP = frozenset(h.lower().encode() for h in HOP_BY_HOP)
# Set by admission (X-Forwarded-*, X-Request-ID) or kept apart (Host, Content-Length).
# RFC 9110 fields defined as one value; a second line is a smuggling or
# confusion attempt (RFC 9112 3.2 for Host). aiohttp's parser refuses the same set.
_SINGLETONS = frozenset({b"content-length", b"content-location", b"content-range", b"content-type", b"etag",
                         b"host", b"max-forwards", b"server", b"transfer-encoding", b"user-agent"})
_APART = frozenset({b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto",
                    b"x-forwarded-host", b"x-request-id"})


class FastHead:
    """The request line and headers as llhttp gave them (admission.RequestHead)."""

    __slots__ = ("method", "target", "peer", "content_length", "has_body", "header_count",
                 "header_size", "raw", "_index", "version", "keep_alive", "body", "started",
                 "complete", "upgrade", "reject", "malformed", "_pairs", "special")

    def __init__(self, method: str, target: str, raw: list[tuple[bytes, bytes]], peer: str | None,
                 version: str, keep_alive: bool, started: float) -> None:
        self.method = method
        self.target = target
        self.raw = raw
        self.peer = peer
        self.version = version
        self.keep_alive = keep_alive
        self.started = started
        self.header_count = len(raw)
        self.complete = False
        self.upgrade = False
        self.body: RequestBody | None = None
        self.reject: Any = None  # a SidecarError to answer instead of routing
        self.malformed = False
        index: dict[bytes, bytes] = {}
        size = 0
        # What build() forwards when the request names nothing in Connection
        # and has no Expect (nearly always): made in this same pass.
        pairs: list[tuple[bytes, bytes]] = []
        self._pairs = pairs
        for k, v in raw:
            size += len(k) + len(v) + 4
            lk = k.lower()
            if lk not in _HOP and lk not in _APART:
                pairs.append((k, v))
            if lk in index:
                # RFC 9110 5.3: repeated fields combine with commas (a lookup
                # sees all of them, as CIMultiDict.get would see the first).
                if lk == b"connection":
                    index[lk] += b", " + v
                elif lk in _SINGLETONS:
                    self.malformed = True
                continue
            index[lk] = v
        self.header_size = size
        self._index = index
        self.special = b"upgrade" in index or b"expect" in index
        if version == "1.1" and b"host" not in index:
            self.malformed = True  # RFC 9112 3.2: an HTTP/1.1 request without Host is 400
        cl = index.get(b"content-length")
        # llhttp already refused a non-numeric, negative or conflicting length.
        self.content_length = int(cl) if cl is not None else None
        self.has_body = (self.content_length or 0) > 0 or b"transfer-encoding" in index

    def get(self, name: str) -> str | None:
        # b"" for a name that is no token: llhttp let no such header through.
        v = self._index.get(_KEYS.get(name) or _key(name))
        return None if v is None else v.decode("utf-8", "surrogateescape")

    def build(self, route: "Route", path: str, query: str, extra: list[tuple[str, str]],
              drop_expect: bool, *, request_id: str, started: float, max_body: int,
              target: str | None = None, body_length: int | None = None, tenant: str | None = None,
              client_ip: str | None = None, deadline: float | None = None) -> RawExchange:
        """The Exchange with the forwarded headers: hop-by-hop ones (and those
        named in Connection, RFC 9110 7.6.1) dropped, the rest kept as bytes."""
        idx = self._index
        conn = idx.get(b"connection")
        if conn or drop_expect:
            drop = {t.strip().lower() for t in conn.split(b",") if t.strip()} if conn else set()
            if drop_expect:
                drop.add(b"expect")
            pairs = [(k, v) for k, v in self._pairs if k.lower() not in drop]
        else:
            pairs = self._pairs
        parts: list[bytes] = []
        for k, v in pairs:
            parts += (k, b": ", v, b"\r\n")
        parts.append("".join([f"{k}: {v}\r\n" for k, v in extra]).encode("utf-8", "surrogateescape"))
        ex = RawExchange.new(route, self.method, path, query, b"".join(parts), pairs, extra,
                             idx.get(b"host"), idx.get(b"content-length"), request_id, started, max_body,
                             (path + "?" + query if query else path) if target is None else target,
                             body_length, tenant, client_ip, deadline)
        body = self.body
        if body is not None and self.has_body:
            body.limit = route.max_body
            ex.vars["_overflow"] = body
            ex.body = body
        return ex

    def headers_view(self) -> Any:
        """The client's headers as a mapping (for ``[logging] log_headers``)."""
        from multidict import CIMultiDict

        return CIMultiDict([(k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                            for k, v in self.raw])
