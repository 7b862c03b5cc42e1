"""WebSocket passthrough: bytes relayed both ways after a 101 (issue 10).

The sidecar does not parse WebSocket frames: once the upstream said 101, the
client connection and the upstream connection are spliced. Each direction has
backpressure (a side whose writes are paused stops the other side's reading),
either side closing closes the other, and a tunnel quiet for the route's
``idle`` timeout is closed (Envoy's idle_timeout on upgraded streams).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..fastclient.conn import Conn
    from .protocol import ServerConnection


class Tunnel:
    """The spliced pair; ``done`` resolves when both sides are closed."""

    __slots__ = ("client", "up", "idle", "done", "to_upstream", "to_client", "ended_by", "started")

    def __init__(self, client: "ServerConnection", up: "Conn", idle: float | None) -> None:
        self.client = client
        self.up = up
        self.idle = idle
        self.done: asyncio.Future[None] = client.loop.create_future()
        self.to_upstream = 0
        self.to_client = 0
        self.ended_by = ""
        self.started = time.monotonic()

    def start(self, upstream_tail: bytes, client_tail: bytes) -> None:
        client, up = self.client, self.up
        client.tunnel = self
        up.tunnel = self
        self._touch()
        if up.closed or up.transport is None or up.transport.is_closing():
            self.close("upstream")
            return
        if upstream_tail:
            self.from_upstream(upstream_tail)
        if client_tail:
            self.from_client(client_tail)
        t = client.transport
        if t is not None and not self.done.done():
            client._reading_paused = False
            t.resume_reading()

    def _touch(self) -> None:
        if self.idle:
            self.client.deadline = time.monotonic() + self.idle
            self.client.deadline_kind = "tunnel"

    def from_client(self, data: bytes) -> None:
        t = self.up.transport
        if t is None or self.done.done():
            return
        self.to_upstream += len(data)
        t.write(data)
        self._touch()
        if self.up._paused_writing:
            ct = self.client.transport
            if ct is not None:
                ct.pause_reading()

    def from_upstream(self, data: bytes) -> None:
        t = self.client.transport
        if t is None or self.done.done():
            return
        self.to_client += len(data)
        t.write(data)
        self._touch()
        if self.client.paused_writing and self.up.transport is not None:
            self.up.transport.pause_reading()

    def client_writable(self) -> None:
        if not self.done.done() and self.up.transport is not None:
            self.up.transport.resume_reading()

    def upstream_writable(self) -> None:
        ct = self.client.transport
        if not self.done.done() and ct is not None:
            ct.resume_reading()

    def close(self, by: str) -> None:
        """One side ended (or the tunnel idled): close both, after what each
        side still has to write (a WebSocket close frame) is flushed."""
        if self.done.done():
            return
        self.ended_by = by
        self.client.deadline = None
        for t in (self.client.transport, self.up.transport):
            if t is not None and not t.is_closing():
                t.close()
        self.done.set_result(None)
