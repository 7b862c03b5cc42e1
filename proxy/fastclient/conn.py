"""One upstream connection: an asyncio Protocol driving llhttp, and the
response-body lease that owns it until the response is done."""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import TYPE_CHECKING, Any

import httptools

from ..errors import (SidecarError, UpstreamBadResponse, UpstreamTimeout, UpstreamTLSError,
                      UpstreamUnavailable)
from ..http import _HOP_LOWER

if TYPE_CHECKING:
    from .pool import Pool

_HOP_BYTES = frozenset(h.encode("latin-1") for h in _HOP_LOWER)
# The upstream's Connection value -> the names a response drops with it
# ("keep-alive" on every nginx answer: made once, not per response).
_DROP: dict[str, frozenset[bytes]] = {}


def _drop_for(tokens: str) -> frozenset[bytes]:
    drop = _HOP_BYTES | {t.strip().lower().encode("latin-1") for t in tokens.split(",") if t.strip()}
    if len(_DROP) >= 256:   # values an upstream makes up: stay bounded
        _DROP.clear()
    _DROP[tokens] = drop
    return drop


# Download flow control: stop reading the upstream socket while this much is
# buffered and not yet written to the client; resume below the low mark.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
_EMPTY_NO_BODY = frozenset({204, 304})


class _Failed(Exception):
    """Connection-level failure; ``sent_nothing`` says no byte reached the wire
    and ``got_nothing`` that no response byte came back."""

    def __init__(self, kind: str, detail: str = "", *, got_nothing: bool = False) -> None:
        super().__init__(detail)
        self.kind = kind  # "reset" | "timeout" | "tls" | "protocol" | "connect" | "bad_response"
        self.got_nothing = got_nothing


class _TooManyHeaders(Exception):
    """Raised inside llhttp's header callback to stop parsing at once."""


class Conn(asyncio.Protocol):
    """One upstream connection; handles one request at a time (no pipelining)."""

    __slots__ = ("pool", "transport", "parser", "requests", "idle_since", "closed", "_head_waiter",
                 "_body_waiter", "_drain_waiter", "_chunks", "_buffered", "_paused_reading",
                 "_paused_writing", "_status", "_reason", "_headers", "_conn_tokens", "_complete",
                 "_error", "_got_bytes", "_head_request", "_keep_alive", "_eof_body", "_framed_by_length",
                 "_timer", "_timer_when", "_wait_until", "_waiting", "_deadline", "_idle", "_poisoned", "counted",
                 "_upgrade", "_tail", "tunnel", "_head_left", "_max_head", "_max_headers", "_too_big",
                 "_express", "_fwd", "_spare", "__weakref__")

    def __init__(self, pool: "Pool") -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser: Any = None
        self.requests = 0
        self.idle_since = 0.0
        self.closed = False
        self._head_waiter: asyncio.Future | None = None
        self._body_waiter: asyncio.Future | None = None
        self._drain_waiter: asyncio.Future | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused_reading = False
        self._paused_writing = False
        self._error: _Failed | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._wait_until = 0.0
        self._waiting: Any = None  # what the timer times out: a future or an express request
        self.counted = False  # holds one of the pool's ``limit`` slots
        # WebSocket passthrough: the request asked to upgrade; after a 101 the
        # bytes past the head (_tail) and all later ones go to ``tunnel``.
        self._upgrade = False
        self._tail = b""
        self.tunnel: Any = None
        self._head_left = -1
        self._max_head = 0
        self._max_headers = 0
        # The express path (proxy/fastserver/express.py) waits with a callback
        # instead of a future: called once, when the response head arrived
        # (with or without its whole body) or the exchange failed.
        self._express: Any = None
        # The parser of the last response, kept for the next one: llhttp is
        # ready for the next message of a keep-alive connection, and making
        # a parser (two allocations, eight callback lookups) cost ~1 µs.
        self._spare: Any = None
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._reason: str | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._conn_tokens: str | None = None
        self._fwd: list[tuple[bytes, bytes]] = []
        self._complete = False
        self._got_bytes = False
        self._head_request = False
        self._keep_alive = True
        self._eof_body = False
        self._framed_by_length = False
        self._poisoned = False
        self._too_big: str | None = None

    # ---- asyncio.Protocol ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_upstream(data)
            return
        if self.parser is None:
            # Bytes while idle: the upstream talks out of turn; never reuse it.
            self._fail(_Failed("protocol", "unexpected bytes on an idle connection"))
            return
        self._got_bytes = True
        parser = self.parser
        base = 0   # where in ``data`` the chunk being fed starts (an upgrade's tail)
        try:
            left = self._head_left
            if left < 0:
                parser.feed_data(data)
            elif len(data) <= left:
                self._head_left = left - len(data)
                parser.feed_data(data)
            else:
                # SECURITY (issue 11, item 1): llhttp buffers a header line
                # inside the parser until it ends, so an upstream sending
                # header bytes forever would grow memory without bound. Feed
                # no more than the head may still take; if the head did not
                # end within that, the response is refused.
                self._head_left = 0
                if left:
                    parser.feed_data(data[:left])
                if self._head_left >= 0:
                    self._too_big = f"response head larger than {self._max_head} bytes"
                    self._fail(_Failed("bad_response", self._too_big))
                    return
                base = left
                parser.feed_data(data[left:])
        except httptools.HttpParserUpgrade as e:
            if self._upgrade and self._status == 101:
                # What follows the 101 head is the upgraded protocol's (issue 10);
                # the parser's offset counts from the chunk it was fed.
                self._tail = data[base + e.args[0]:] if e.args else b""
                self.parser = None
            else:
                self._fail(_Failed("protocol", "upstream switched protocols (101) unasked"))
        except httptools.HttpParserError as e:
            if self._too_big is not None:
                self._fail(_Failed("bad_response", self._too_big))
            else:
                self._fail(_Failed("bad_response", f"upstream sent a malformed response ({type(e).__name__})"))
        if self._express is not None and self._status:
            self._call_express()

    def eof_received(self) -> bool | None:
        self._lost(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self.tunnel is not None:
            self.tunnel.upstream_writable()
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # ---- llhttp callbacks ------------------------------------------------

    def on_status(self, status: bytes) -> None:
        if self.parser is None:
            self._out_of_turn()
        # Called once per read the status line spans: the pieces add up.
        reason = status.decode("utf-8", "surrogateescape")
        self._reason = reason if self._reason is None else self._reason + reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.parser is None:
            self._out_of_turn()
        headers = self._headers
        if len(headers) >= self._max_headers:
            self._too_big = f"more than {self._max_headers} response headers"
            raise _TooManyHeaders()
        headers.append((name, value))  # bytes: decoded only if a mapping is built

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status == 101:
            if self._upgrade:
                self._status = 101
                w = self._head_waiter
                if w is not None and not w.done():
                    w.set_result(None)
            return  # feed_data raises HttpParserUpgrade next (data_received)
        if 100 <= status < 200:
            # RFC 9110 15.2: interim responses are not forwarded (aiohttp's
            # client drops them too); the final response follows. The head
            # byte budget is not renewed: interim and final heads share it.
            self._headers = []
            self._reason = None
            return
        self._status = status
        self._head_left = -1
        w = self._head_waiter
        if w is not None and not w.done():
            w.set_result(None)
        if self._head_request:
            # llhttp cannot be told a response answers HEAD; the body it would
            # wait for never comes, so the message ends here and this parser
            # is dropped (a fresh one parses the next response).
            self._keep_alive = self.parser.should_keep_alive()
            self.parser = None
            self._finish()

    def on_body(self, body: bytes) -> None:
        if self.parser is None:
            self._out_of_turn()
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()
        w = self._body_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def on_message_complete(self) -> None:
        if self._status == 0:
            return  # an interim (1xx) message
        parser = self.parser
        if parser is not None:
            keep = self._keep_alive = parser.should_keep_alive()
            if keep:
                self._spare = parser
            self.parser = None
        self._finish()

    def _out_of_turn(self) -> None:
        """Bytes past the end of the response, in the same read: the upstream
        talks out of turn, so neither this connection nor its parser is reused."""
        self._spare = None
        self._poisoned = True

    # ---- state changes -----------------------------------------------------

    def _finish(self) -> None:
        self._complete = True
        w = self._body_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, err: _Failed) -> None:
        if self._error is None:
            self._error = err
        self.close()
        self._wake()

    def _wake(self) -> None:
        for w in (self._head_waiter, self._body_waiter, self._drain_waiter):
            if w is not None and not w.done():
                w.set_result(None)
        if self._express is not None:
            self._call_express()

    def _call_express(self) -> None:
        cb, self._express = self._express, None
        self._waiting = None
        cb(self)

    def start_express(self, callback: Any, waiter: Any) -> None:
        """Wait for the response with ``callback(conn)`` instead of a future;
        ``waiter.done()`` tells the timer whether it is still waited for."""
        self._express = callback
        self._arm(waiter, self.pool.loop)

    def _lost(self, exc: Exception | None) -> None:
        if self.tunnel is not None:
            self.tunnel.close("upstream")
        was_closed = self.closed
        self.closed = True
        if self.parser is not None and self._status and not self._complete and self._eof_body:
            # A body delimited by the end of the connection (RFC 9112 6.3 item 8).
            self.parser = None
            self._keep_alive = False
            self._finish()
        elif self.parser is not None and self._error is None:
            if isinstance(exc, ssl.SSLError):
                self._error = _Failed("tls", "TLS error on the upstream connection")
            else:
                self._error = _Failed("reset", "upstream closed or reset the connection",
                                      got_nothing=not self._got_bytes)
        if not was_closed:
            self.pool._forget(self)
        if self.transport is not None and exc is None and not self.transport.is_closing():
            self.transport.close()
        self._wake()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.closed:
            self.closed = True
            self.pool._forget(self)
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    # ---- one request ---------------------------------------------------------

    def _arm(self, waiter: Any, loop: asyncio.AbstractEventLoop) -> None:
        """Time out ``waiter`` after the idle timeout or at the total deadline.

        One lazily re-armed timer per connection instead of a call_later and a
        cancel per wait (which cost ~2 µs per request): a wait only moves
        ``_wait_until``; the timer re-schedules itself when it fires early.
        """
        wait = self._idle
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                left = 0.0
            if wait is None or left < wait:
                wait = left
        if wait is None:
            self._waiting = None
            return
        until = loop.time() + wait
        self._wait_until = until
        self._waiting = waiter
        if self._timer is None or self._timer_when > until:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(until, self._tick)
            self._timer_when = until

    def _tick(self) -> None:
        self._timer = None
        w = self._waiting
        if w is None or w.done() or self.closed:
            return
        loop = self.pool.loop
        if loop.time() >= self._wait_until:
            if self._error is None:
                self._error = _Failed("timeout", "upstream did not answer in time")
            self.close()
        else:
            self._timer = loop.call_at(self._wait_until, self._tick)
            self._timer_when = self._wait_until

    def begin(self, head_request: bool, idle: float | None, deadline: float | None,
              max_head: int, max_headers: int) -> None:
        self._reset()
        self._head_left = self._max_head = max_head
        self._max_headers = max_headers
        self._head_request = head_request
        self._idle = idle
        self._deadline = deadline
        self._chunks.clear()
        self._buffered = 0
        parser = self._spare
        if parser is None:
            parser = httptools.HttpResponseParser(self)
        else:
            self._spare = None
        self.parser = parser
        self.requests += 1

    async def wait_head(self) -> None:
        loop = self.pool.loop
        while not self._status and self._error is None and not self.closed:
            w = self._head_waiter = loop.create_future()
            self._arm(w, loop)
            try:
                await w
            finally:
                self._head_waiter = None
                self._waiting = None
        if not self._status:
            raise self._error or _Failed("reset", "upstream closed the connection",
                                         got_nothing=not self._got_bytes)
        self._headers_done()

    def _headers_done(self) -> None:
        """The framing the response head declares, and its fields to forward
        (``_fwd``), in one pass over the head."""
        te = tokens = None
        fwd = []
        for k, v in self._headers:
            lk = k.lower()
            if lk in _HOP_BYTES:
                if lk == b"connection":
                    t = v.decode("latin-1")
                    tokens = t if tokens is None else f"{tokens},{t}"
                elif lk == b"transfer-encoding":
                    te = v
                continue
            if lk == b"content-length":
                self._framed_by_length = True
            fwd.append((k, v))
        if tokens:
            # RFC 9110 7.6.1: the names the upstream's Connection lists go too.
            drop = _DROP.get(tokens) or _drop_for(tokens)
            if len(drop) > len(_HOP_BYTES):
                fwd = [(k, v) for k, v in fwd if k.lower() not in drop]
        self._conn_tokens = tokens
        # The response's fields without the hop-by-hop ones (and those the
        # upstream's Connection names, RFC 9110 7.6.1): what is forwarded.
        self._fwd = fwd
        if not self._framed_by_length and te is None and not self._head_request \
                and self._status not in _EMPTY_NO_BODY:
            self._eof_body = True

    async def next_chunk(self) -> bytes:
        """The next body chunk; b"" at the end of the message."""
        while True:
            chunks = self._chunks
            if chunks:
                chunk = chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused_reading and self._buffered < LOW_WATER and not self.closed:
                    self._paused_reading = False
                    self.transport.resume_reading()  # type: ignore[union-attr]
                return chunk
            if self._complete:
                return b""
            if self._error is not None or self.closed:
                raise self._error or _Failed("reset", "upstream closed the connection mid-body")
            loop = self.pool.loop
            w = self._body_waiter = loop.create_future()
            self._arm(w, loop)
            try:
                await w
            finally:
                self._body_waiter = None
                self._waiting = None

    def take_body(self) -> bytes | None:
        """The whole body when it has already arrived and was framed by Content-Length."""
        if (self._complete and self._framed_by_length and not self._head_request
                and self._status not in _EMPTY_NO_BODY):
            chunks = self._chunks
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self._buffered = 0
            return data
        return None

    async def drain(self) -> None:
        while self._paused_writing and not self.closed:
            w = self._drain_waiter = self.pool.loop.create_future()
            try:
                await w
            finally:
                self._drain_waiter = None
        if self.closed:
            raise self._error or _Failed("reset", "upstream closed the connection while we were sending")

    def reusable(self) -> bool:
        return (self._complete and self._keep_alive and not self._poisoned and not self.closed
                and self._error is None
                and not self._chunks and (self._conn_tokens is None
                                          or "close" not in self._conn_tokens.lower()))

    def release(self, ok: bool) -> None:
        """Back to the pool when the exchange finished cleanly, else closed."""
        pool = self.pool
        if pool.ssl is not None and self.requests == 1 and self._complete and not self.closed:
            # After a full exchange the TLS 1.3 session tickets have arrived.
            pool.ssl.remember(pool.host, self.transport)
        if ok and self.reusable():
            self.pool._put(self)
        else:
            self.close()


class _Lease:
    """The response body as an async iterator; owns the connection until released."""

    __slots__ = ("conn", "__weakref__")

    def __init__(self, conn: Conn) -> None:
        self.conn: Conn | None = conn

    def __aiter__(self) -> "_Lease":
        return self

    async def __anext__(self) -> bytes:
        conn = self.conn
        if conn is None:
            raise StopAsyncIteration
        try:
            chunk = await conn.next_chunk()
        except _Failed as e:
            self.release(False)
            raise _map(e, conn.pool) from None
        except BaseException:
            self.release(False)
            raise
        if not chunk:
            self.release(True)
            raise StopAsyncIteration
        return chunk

    def release(self, ok: bool) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.release(ok)

    def __del__(self) -> None:
        # A response dropped without close()/done() must not pin a pool slot.
        if self.conn is not None:
            self.conn.close()


def _map(e: _Failed, pool: "Pool") -> SidecarError:
    where = pool.where
    if e.kind == "timeout":
        return UpstreamTimeout(f"upstream {where} did not answer in time")
    if e.kind == "tls":
        return UpstreamTLSError(f"TLS with upstream {where} failed: certificate or handshake error")
    if e.kind == "connect":
        return UpstreamUnavailable(f"cannot connect to upstream {where}")
    if e.kind == "bad_response":
        return UpstreamBadResponse(f"upstream {where}: {e}")
    if e.kind == "protocol":
        return UpstreamUnavailable(f"upstream {where}: {e}")
    return UpstreamUnavailable(f"upstream {where} closed or reset the connection")
