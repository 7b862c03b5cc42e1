"""Accepting connections under a cap (``max_connections``), for every listener.

asyncio's Server has no way to stop accepting for a while; this reads the
listening socket itself. Past ``limit`` open connections it stops reading it,
so new connections wait in the kernel's backlog (nginx's worker_connections,
without nginx's error log line per refusal) until one closes. The fast server
and the aiohttp-served listeners (proxy/server.py) both use it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("sidecar.fastserver")


class Acceptor:
    """Accepts on ``sock`` and hands each connection to ``factory()``'s protocol.

    The owner calls ``opened()`` / ``closed()`` as connections come and go.
    """

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.Protocol], limit: int,
                 name: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock: socket.socket | None = sock
        self.factory = factory
        self.limit = limit
        self.name = name
        self.open = 0
        self._opening = 0
        self._reading = False
        self._backoff: asyncio.TimerHandle | None = None
        self._resume()

    def _resume(self) -> None:
        if not self._reading and self.sock is not None and self._backoff is None:
            self._reading = True
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _pause(self) -> None:
        if self._reading and self.sock is not None:
            self._reading = False
            self.loop.remove_reader(self.sock.fileno())

    def _accept(self) -> None:
        sock = self.sock
        if sock is None:
            return
        for _ in range(64):
            if self.open + self._opening >= self.limit:
                self._pause()
                return
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # EMFILE/ENFILE: out of file descriptors. Stop reading the
                # listening socket for a moment instead of spinning on it.
                log.error("%s: accept failed (%s); new connections wait 1 s", self.name, e.strerror)
                self._pause()
                self._backoff = self.loop.call_later(1.0, self._after_backoff)
                return
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._opening += 1
            self.loop.create_task(self._connect(conn))

    def _after_backoff(self) -> None:
        self._backoff = None
        if self.open + self._opening < self.limit:
            self._resume()

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn)
        except OSError:
            conn.close()
        finally:
            self._opening -= 1

    def opened(self) -> None:
        self.open += 1

    def closed(self) -> None:
        self.open -= 1
        if not self._reading and self.open + self._opening < self.limit:
            self._resume()

    def close(self) -> None:
        """Close the listening socket: new connections are refused at once."""
        self._pause()
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
