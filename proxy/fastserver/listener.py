"""The fast server's listening socket: accept, connection cap, timeouts, drain."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from ..admission import Admission
from .accept import Acceptor
from ..writebatch import WriteBatch
from .protocol import ServerConnection

if TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger("sidecar.fastserver")


class FastServer:
    """One listener of asyncio-protocol connections (``[outbound] server = "fast"``).

    ``match(path)`` gives the route; ``admission`` the shared checks. Past
    ``max_connections`` open connections the listening socket is no longer
    read, so new connections wait in the kernel's backlog (nginx's
    worker_connections, without the error) until one closes.
    """

    def __init__(self, runtime: "Runtime", match: Any, admission: Admission, *, header_timeout: float,
                 keepalive_timeout: float, max_connections: int, max_line: int, max_field: int,
                 max_headers: int) -> None:
        self.rt = runtime
        self.match = match
        self.admission = admission
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = max_connections
        self.max_line = max_line
        self.max_field = max_field
        self.max_headers = max_headers
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.batch: WriteBatch = None  # type: ignore[assignment]
        self.conns: set[ServerConnection] = set()
        self.acceptor: Acceptor | None = None
        self.port = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._empty: asyncio.Event | None = None

    async def start(self, sock: socket.socket) -> None:
        self.loop = asyncio.get_running_loop()
        self.batch = WriteBatch(self.loop)
        self._empty = asyncio.Event()
        self.acceptor = Acceptor(sock, lambda: ServerConnection(self), self.max_connections, "outbound")
        # Deadlines are checked by one sweep per listener, not a timer per
        # request (arming and cancelling timers costs ~2 µs a request); a
        # deadline fires up to one tick late.
        self._tick = max(0.05, min(1.0, self.header_timeout / 4, self.keepalive_timeout / 4))
        self._sweeper = self.loop.call_later(self._tick, self._sweep)

    def connection_opened(self, conn: ServerConnection) -> None:
        self.conns.add(conn)
        if self.acceptor is not None:
            self.acceptor.opened()
        if self._empty is not None:
            self._empty.clear()

    def connection_closed(self, conn: ServerConnection) -> None:
        self.conns.discard(conn)
        if self.acceptor is not None:
            self.acceptor.closed()
        if not self.conns and self._empty is not None:
            self._empty.set()

    # ---- deadlines ---------------------------------------------------------------

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self.conns if c.deadline is not None and c.deadline <= now]:
            conn.expire()
        self._sweeper = self.loop.call_later(self._tick, self._sweep)

    # ---- drain ---------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """Close the listening socket: new connections are refused at once."""
        if self.acceptor is not None:
            self.acceptor.close()

    async def drain(self, timeout: float) -> None:
        """Idle connections close now, busy ones after their response; past
        ``timeout`` the rest are cut (their requests log 499)."""
        self.stop_accepting()
        for conn in list(self.conns):
            conn.shutdown()
        if self.conns and self._empty is not None:
            try:
                await asyncio.wait_for(self._empty.wait(), timeout)
            except (TimeoutError, asyncio.TimeoutError):
                log.warning("drain: %d connection(s) still busy after %.1fs; closing them",
                            len(self.conns), timeout)
        for conn in list(self.conns):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        # Let the cut requests run their cancellation (access-log lines).
        await asyncio.sleep(0)
