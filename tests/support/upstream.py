"""Fake upstreams: the kit's (proxy.testing) plus what only this repository's tests use."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from proxy.testing import FakeUpstream, Responder, Seen, echo, serve, wait_for

__all__ = ["FakeUpstream", "Responder", "Seen", "ThreadedApp", "dribble", "echo", "serve", "wait_for"]


def dribble(body: bytes, *, status: int = 200, piece: int = 1000, pause: float = 0.02) -> Responder:
    """A responder that sends ``body`` in pieces with pauses, so a reader sees
    several chunks (a slow link, chunked encoding), not one."""
    async def respond(request: web.Request, seen: Seen) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for i in range(0, len(body), piece):
            await resp.write(body[i:i + piece])
            await asyncio.sleep(pause)
        await resp.write_eof()
        return resp
    return respond


class ThreadedApp:
    """An aiohttp app served from its own thread and loop, for tests whose
    sidecar is a subprocess and whose client runs under ``asyncio.run``."""

    def __init__(self, make_app: Callable[[], web.Application]) -> None:
        import threading

        self.make_app = make_app
        self.port = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        async def main() -> None:
            runner, self.port = await serve(self.make_app())
            self._ready.set()
            while not self._stop.is_set():
                await asyncio.sleep(0.05)
            await runner.cleanup()
        asyncio.run(main())

    def start(self) -> "ThreadedApp":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("threaded upstream did not start")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
