"""The built-in fast upstream: asyncio protocol + httptools, used when nginx is
absent (throughput) and always for SSE, upload and download measurements.

    GET  /json                small JSON (what every throughput run fetches)
    GET  /sse                 text/event-stream: one event at once, then one per 100 ms, 5 in all
    GET  /download?bytes=N    N bytes, Content-Length framed, written with backpressure
    POST /upload              reads and discards the body, answers with its size

Run: ``python -m bench.upstream PORT``.
"""

from __future__ import annotations

import asyncio
import sys

import httptools

JSON = b'{"ok":true,"service":"bench","items":[1,2,3,4,5,6,7,8]}'
JSON_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                 + str(len(JSON)).encode() + b"\r\n\r\n" + JSON)
BLOCK = b"\0" * (256 * 1024)
# The event loop holds tasks weakly: a writer task with no other reference can be
# collected mid-answer (asyncio.create_task docs).
_writers: set[asyncio.Future] = set()


def _keep(task: asyncio.Future) -> None:
    _writers.add(task)
    task.add_done_callback(_writers.discard)


class Handler(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.received = 0
        self.transport: asyncio.Transport  # connection_made sets it before any data arrives
        self.paused = False
        self.waiter: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc) -> None:
        self.resume_writing()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_begin(self) -> None:
        self.url = b""
        self.received = 0

    def on_body(self, body: bytes) -> None:
        self.received += len(body)

    def on_message_complete(self) -> None:
        url = self.url
        if url == b"/json":
            self.transport.write(JSON_RESPONSE)
        elif url == b"/upload":
            body = str(self.received).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        elif url.startswith(b"/download"):
            n = int(url.partition(b"bytes=")[2] or b"0")
            _keep(asyncio.ensure_future(self.download(n)))
        elif url == b"/sse":
            _keep(asyncio.ensure_future(self.sse()))
        else:
            self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    async def download(self, n: int) -> None:
        t = self.transport
        t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % n)
        while n > 0 and not t.is_closing():
            part = BLOCK if n >= len(BLOCK) else BLOCK[:n]
            t.write(part)
            n -= len(part)
            if self.paused:
                self.waiter = asyncio.get_running_loop().create_future()
                await self.waiter

    async def sse(self) -> None:
        t = self.transport
        t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        for i in range(5):
            if t.is_closing():
                return
            ev = b"data: tick %d\n\n" % i
            t.write(b"%x\r\n%b\r\n" % (len(ev), ev))
            await asyncio.sleep(0.1)
        if not t.is_closing():
            t.write(b"0\r\n\r\n")


async def serve(port: int, host: str = "127.0.0.1") -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(Handler, host, port, backlog=4096, reuse_address=True)


def main() -> None:
    port = int(sys.argv[1])
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass

    async def run() -> None:
        server = await serve(port)
        print("ready", flush=True)
        await server.serve_forever()

    asyncio.run(run())


if __name__ == "__main__":
    main()
