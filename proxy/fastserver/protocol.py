"""One client connection on the fast server: llhttp parsing, pipelining, flow control.

Requests on a connection are answered in order, one at a time. Each parsed
request has its own body buffer, so a pipelined request's bytes never reach
the request before it; while a request is in flight and another is already
queued, reading pauses. Request bodies are read only as fast as the upstream
side takes them (pause_reading above HIGH_WATER), responses are written only
as fast as the client reads them (pause_writing / resume_writing).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Any

import httptools

from ..errors import LINGER, BadRequest, HeadersTooLarge, RequestTimeout, SidecarError, closing_error_response
from ..http import new_request_id
from .body import ClientGone, RequestBody
from .express import start as serve
from .head import FastHead
from .tunnel import Tunnel

if TYPE_CHECKING:
    from .listener import FastServer

log = logging.getLogger("sidecar.fastserver")


class _TooLarge(Exception):
    """Raised from a parser callback: the request line or headers pass the limits."""


class ServerConnection(asyncio.Protocol):
    """The asyncio Protocol of one client connection."""

    def __init__(self, server: "FastServer") -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer: str | None = None
        self.closed = False
        self.closing = False         # draining or told to close: no further request
        self.input_done = False      # parse error or upgrade: bytes are no longer parsed
        self.active: FastHead | None = None
        self.task: Any = None  # the request's Driven coroutine or express request
        self.queue: collections.deque[FastHead] = collections.deque()
        self.parsing: FastHead | None = None
        self.in_head = False
        self.deadline: float | None = None
        self.deadline_kind = ""
        self.paused_writing = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body_full = False
        self._reading_paused = False
        self.pending_error: SidecarError | None = None
        self.tunnel: Tunnel | None = None
        self.upgrade_tail = b""
        self._starting = False
        self._batched = False  # bytes of this connection wait in the server's WriteBatch
        self.lingering = False   # answered and half-closed: input is read and dropped

    # ---- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        self.server.connection_opened(self)
        # nginx's client_header_timeout: the first request head is due from accept.
        self.deadline = time.monotonic() + self.server.header_timeout
        self.deadline_kind = "header"

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        if self.input_done:
            return
        try:
            self.parser.feed_data(data)
            # Requests start once the whole read is parsed, so a body that
            # came in the same packet is complete when the answer is written.
            if self.active is None and self.queue:
                self._next()
        except httptools.HttpParserUpgrade as e:
            # The upgrade request itself was queued; what follows it is not
            # HTTP/1.1 (WebSocket frames, relayed once the upstream said 101).
            self.upgrade_tail = data[e.args[0]:] if e.args else b""
            self._stop_input()
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _TooLarge):
                self._parse_error(HeadersTooLarge("request headers exceed the limit"), e.__context__)
            else:
                log.error("fast server: parser callback failed", exc_info=e.__context__ or e)
                self._parse_error(BadRequest("malformed HTTP request"), e)
        except httptools.HttpParserError as e:
            self._parse_error(BadRequest("malformed HTTP request"), e)

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            self.tunnel.close("client")
            return None
        if self.parsing is not None and self.parsing.body is not None:
            self.parsing.body.fail(ClientGone("the client closed before the request body ended"))
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.deadline = None
        self.server.connection_closed(self)
        if self.tunnel is not None:
            # The usual end of a WebSocket: the request finishes normally.
            self.tunnel.close("client")
            return
        parsing = self.parsing
        if parsing is not None and parsing.body is not None:
            parsing.body.fail(ClientGone("the client went away"))
        self.queue.clear()
        task = self.task
        if task is not None and not task.done():
            # The client left mid-request: cancel the upstream exchange (the
            # handler logs it as 499 client_closed), as aiohttp's
            # handler_cancellation does.
            task.cancel()
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        if self.tunnel is not None:
            self.tunnel.client_writable()
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def drain(self) -> None:
        while self.paused_writing and not self.closed:
            w = self.drain_waiter = self.loop.create_future()
            try:
                await w
            finally:
                self.drain_waiter = None
        if self.closed:
            raise ClientGone("the client went away")

    # ---- llhttp callbacks ----------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self.in_head = True
        if self.active is None:
            self.deadline = time.monotonic() + self.server.header_timeout
            self.deadline_kind = "header"

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.server.max_line:
            raise _TooLarge("request line")

    def on_header(self, name: bytes, value: bytes) -> None:
        if value and value[-1] in (32, 9):
            value = value.rstrip(b" \t")  # RFC 9110 5.5: OWS is not part of the value
        srv = self.server
        if len(name) > srv.max_field or len(value) > srv.max_field:
            raise _TooLarge("header field")
        h = self._headers
        h.append((name, value))
        if len(h) > srv.max_headers:
            raise _TooLarge("header count")

    def on_headers_complete(self) -> None:
        p = self.parser
        self.in_head = False
        version = p.get_http_version()
        head = FastHead(p.get_method().decode("ascii", "replace"),
                        self._url.decode("utf-8", "surrogateescape"), self._headers, self.peer,
                        version, p.should_keep_alive(), time.monotonic())
        if head.malformed:
            # Answered and closed like the parser's own refusals.
            head.reject = BadRequest("malformed HTTP request")
            head.keep_alive = False
            self._stop_input()
        elif version == "0.9":
            # issue 11: "GET /x" with no version was forwarded as HTTP/1.1 and
            # answered as HTTP/0.9; refuse it and close.
            head.reject = BadRequest("HTTP/0.9 requests are not supported")
            head.keep_alive = False
            self._stop_input()
        if head.has_body:
            head.body = RequestBody(self)
        # Trailer fields of a chunked body come through on_header too: they
        # must not join this head's headers (aiohttp drops them as well).
        self._headers = []
        self.parsing = head
        self.queue.append(head)
        if self.active is None:
            self.deadline = None
        else:
            self._update_reading()

    def on_body(self, body: bytes) -> None:
        head = self.parsing
        if head is not None and head.body is not None:
            head.body.feed(body)

    def on_message_complete(self) -> None:
        head = self.parsing
        if head is None:
            return
        self.parsing = None
        head.complete = True
        if head.body is not None:
            head.body.feed_eof()

    # ---- requests --------------------------------------------------------------

    def _next(self) -> None:
        # A request may be answered before serve() returns (an error, the
        # express path's pipelined answers): finished() then calls back here,
        # and this loop, not a deeper call, starts the next one.
        if self._starting:
            return
        self._starting = True
        try:
            while self.active is None and self.queue and not self.closed \
                    and not self.transport.is_closing():  # type: ignore[union-attr]
                head = self.queue.popleft()
                self.active = head
                if self._reading_paused or self.queue or self._body_full or self.input_done:
                    self._update_reading()  # (else reading stays on: no call per request)
                self._adopt(head, serve(self, head))
        finally:
            self._starting = False

    def _adopt(self, head: FastHead, task: Any) -> None:
        """``task`` answers ``head`` unless serve() already finished it. A
        method of its own: in ``_next`` mypy keeps ``self.active`` narrowed to
        ``head`` across the call, and the mypyc build (setup.py) would check
        that narrowing at run time."""
        if self.active is head:
            self.task = task

    def finished(self, head: FastHead, keep: bool) -> None:
        """The response to ``head`` is written (or abandoned)."""
        self.active = None
        self.task = None
        if self.closed:
            return
        body = head.body
        if body is not None and body.paused:
            body.paused = False
            self._body_full = False
        if not keep or not head.complete:
            if not head.complete or self.queue or self.input_done:
                self._linger()  # the client may still be sending
            else:
                self._close()
            return
        if self.queue:
            self._next()
            return
        if self.pending_error is not None:
            self.error_and_close(self.pending_error)
            return
        if self.closing or self.input_done:
            self._close()
            return
        if self._reading_paused or self._body_full:
            self._update_reading()  # (queue and input_done are empty and False here)
        now = time.monotonic()
        if self.in_head:
            self.deadline = now + self.server.header_timeout
            self.deadline_kind = "header"
        else:
            self.deadline = now + self.server.keepalive_timeout
            self.deadline_kind = "idle"

    def body_full(self, full: bool) -> None:
        self._body_full = full
        self._update_reading()

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or self.closed:
            return
        pause = not self.lingering and (self._body_full or bool(self.queue) or self.input_done)
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                t.pause_reading()
            else:
                t.resume_reading()

    def _stop_input(self) -> None:
        self.input_done = True
        self._update_reading()
        if self.active is None and self.queue:
            self._next()

    def _parse_error(self, err: SidecarError, exc: BaseException) -> None:
        """Answer a malformed request with the JSON error once the requests
        before it are answered, then close (nothing after it can be framed)."""
        log.warning("rejected malformed request from %s: %s", self.peer, type(exc).__name__)
        self._stop_input()
        parsing = self.parsing
        if parsing is not None and parsing.body is not None:
            # The body of a request already being served turned out malformed
            # (a bad chunk): its upstream exchange fails, the connection closes.
            parsing.body.fail(ClientGone("malformed request body"))
            self.parsing = None
            self.closing = True
            return
        self.deadline = None
        if self.active is None:
            self.error_and_close(err)
        else:
            # nginx answers the requests before the malformed one first.
            self.pending_error = err

    def write_soon(self, data: bytes) -> None:
        """Write ``data`` with the other writes of this loop pass (proxy/writebatch.py)."""
        self._batched = True
        self.server.batch.write(self.transport, data)  # type: ignore[arg-type]

    def flush(self) -> None:
        """Send what ``write_soon`` holds, before a direct write or a close."""
        if self._batched:
            self._batched = False
            self.server.batch.flush()

    def error_and_close(self, err: SidecarError) -> None:
        """A sidecar JSON error (with a fresh request id) outside any route, then close."""
        if self.transport is None or self.closed or self.transport.is_closing():
            return
        self.flush()
        self.transport.write(closing_error_response(err, new_request_id()))
        self._linger()

    def _linger(self) -> None:
        """Close after an answer that ends the connection while the client
        may still be sending: FIN now, read and drop what comes, close at
        its EOF or after errors.LINGER (nginx's lingering_close)."""
        t = self.transport
        if t is None or self.closed or t.is_closing():
            return
        self.deadline = None
        self.input_done = True
        self.lingering = True
        self.flush()
        try:
            t.write_eof()
        except (OSError, RuntimeError):
            t.close()
            return
        self._update_reading()
        self.loop.call_later(LINGER, self._close)

    def expire(self) -> None:
        """The deadline passed: 408 for a head that did not arrive, close an idle connection."""
        self.deadline = None
        if self.tunnel is not None:
            self.tunnel.close("idle")
            return
        if self.closed or self.active is not None:
            return
        if self.deadline_kind == "header":
            log.info("request head from %s did not arrive within %.1fs", self.peer,
                     self.server.header_timeout)
            self.error_and_close(RequestTimeout())
        else:
            self._close()

    def shutdown(self) -> None:
        """Drain: no further request on this connection; close it once idle."""
        self.closing = True
        if self.active is None:
            self._close()

    def _close(self) -> None:
        self.deadline = None
        if self.transport is not None and not self.transport.is_closing():
            self.flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
