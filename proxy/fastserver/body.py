"""A request body as it arrives, with flow control toward the client socket."""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING

from ..errors import RequestBodyTooLarge

if TYPE_CHECKING:
    from .protocol import ServerConnection

# Stop reading the client socket while this much of a body is buffered and
# not yet taken by the upstream side; resume below the low mark.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class ClientGone(ConnectionError):
    """The client closed or reset the connection before its body ended."""


class RequestBody:
    """An async iterator of body chunks, fed by the parser.

    Bytes past ``limit`` (the route's ``max_request_body``) raise
    RequestBodyTooLarge and set ``hit`` (read by the aiohttp upstream client
    as its ``BodyOverflow``).
    """

    __slots__ = ("conn", "chunks", "buffered", "eof", "error", "waiter", "taken", "limit", "hit",
                 "paused")

    def __init__(self, conn: "ServerConnection") -> None:
        self.conn = conn
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.eof = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.taken = 0
        self.limit = 1 << 62
        self.hit = False
        self.paused = False

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER and not self.paused:
            self.paused = True
            self.conn.body_full(True)
        self._wake()

    def feed_eof(self) -> None:
        self.eof = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self.eof and self.error is None:
            self.error = exc
            self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def __aiter__(self) -> "RequestBody":
        return self

    async def __anext__(self) -> bytes:
        while True:
            chunks = self.chunks
            if chunks:
                chunk = chunks.popleft()
                self.buffered -= len(chunk)
                if self.paused and self.buffered < LOW_WATER:
                    self.paused = False
                    self.conn.body_full(False)
                self.taken += len(chunk)
                if self.taken > self.limit:
                    self.hit = True
                    raise RequestBodyTooLarge()
                return chunk
            if self.eof:
                raise StopAsyncIteration
            if self.error is not None:
                raise self.error
            w = self.waiter = self.conn.loop.create_future()
            try:
                await w
            finally:
                self.waiter = None
