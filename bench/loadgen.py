"""Python load generation and probes (asyncio protocols + httptools).

- ``closed_loop``: the fallback throughput generator when wrk is absent (it is
  likely the bottleneck, and the report says so).
- ``fixed_rate``: open-loop latency at a constant rate. Latency is measured from
  each request's *intended* send time, so a stalled target is not hidden by
  the generator waiting for it (coordinated omission, as in wrk2).
- ``sse_ttfb``, ``download``, ``upload``, ``idle_connections``: the other probes.
"""

from __future__ import annotations

import asyncio
import gc
import time
from urllib.parse import urlparse

import httptools


class _Client(asyncio.Protocol):
    """One keep-alive connection issuing GETs one at a time."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future | None = None
        self.transport: asyncio.Transport  # connection_made sets it before create_connection returns
        self.status = 0
        self.first_body: float | None = None
        self.first: asyncio.Future | None = None   # resolved at the first body bytes (SSE probe)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.first_body is None:
            self.first_body = time.perf_counter()
            if self.first is not None and not self.first.done():
                self.first.set_result(None)

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(self.status)

    def connection_lost(self, exc) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("closed"))
            self.done.exception()  # retrieved here: an aborted probe is no error
        if self.first is not None and not self.first.done():
            self.first.set_result(None)

    async def get(self, request: bytes) -> int:
        self.done = asyncio.get_running_loop().create_future()
        self.first_body = None
        self.transport.write(request)
        return await self.done


def _request(url: str) -> tuple[str, int, bytes]:
    u = urlparse(url)
    path = u.path + (f"?{u.query}" if u.query else "")
    req = f"GET {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUser-Agent: bench\r\n\r\n".encode()
    return u.hostname or "127.0.0.1", u.port or 80, req


async def _connect(host: str, port: int) -> _Client:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(_Client, host, port)
    return proto


async def closed_loop(url: str, connections: int, duration: float) -> dict:
    host, port, req = _request(url)
    clients = [await _connect(host, port) for _ in range(connections)]
    count = errors = 0
    lat: list[float] = []
    end = time.perf_counter() + duration

    async def lane(c: _Client) -> None:
        nonlocal count, errors
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                status = await c.get(req)
            except ConnectionError:
                errors += 1
                return
            lat.append(time.perf_counter() - t0)
            count += 1
            if status != 200:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(lane(c) for c in clients))
    took = time.perf_counter() - t0
    for c in clients:
        c.transport.close()
    lat.sort()
    return {"requests": count, "rps": count / took, "errors": errors,
            "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99)}


def _pct(sorted_s: list[float], p: float) -> float:
    if not sorted_s:
        return float("nan")
    i = min(len(sorted_s) - 1, int(round(p / 100 * (len(sorted_s) - 1))))
    return sorted_s[i] * 1000


async def fixed_rate(url: str, rate: float, duration: float, connections: int = 16) -> dict:
    host, port, req = _request(url)
    clients = [await _connect(host, port) for _ in range(connections)]
    # Warm up every connection (and the target's pools) before measuring.
    for c in clients:
        await c.get(req)
    total = int(rate * duration)
    # The generator's own collections would pause every lane at once and be
    # charged to the target: none while measuring (8 s of one list of floats).
    gc_was = gc.isenabled()
    gc.disable()
    start = time.perf_counter() + 0.05
    lat: list[float] = []
    errors = 0

    async def lane(k: int, c: _Client) -> None:
        nonlocal errors
        for i in range(k, total, connections):
            intended = start + i / rate
            delay = intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                status = await c.get(req)
            except ConnectionError:
                errors += 1
                return
            lat.append(time.perf_counter() - intended)
            if status != 200:
                errors += 1

    try:
        await asyncio.gather(*(lane(k, c) for k, c in enumerate(clients)))
    finally:
        if gc_was:
            gc.enable()
    for c in clients:
        c.transport.close()
    lat.sort()
    return {"rate": rate, "requests": len(lat), "errors": errors, "p50_ms": _pct(lat, 50),
            "p99_ms": _pct(lat, 99), "p999_ms": _pct(lat, 99.9)}


async def sse_ttfb(url: str, samples: int = 30) -> dict:
    """Time from sending the request to the first event's bytes, on fresh connections."""
    host, port, req = _request(url)
    times = []
    for _ in range(samples):
        c = await _connect(host, port)
        loop = asyncio.get_running_loop()
        c.done, c.first = loop.create_future(), loop.create_future()
        t0 = time.perf_counter()
        c.transport.write(req)
        # Woken by the first body bytes (or the end): a loop polling with
        # sleep(0) here kept one of the two cores busy, and the sidecar's
        # extra hop then waited for the scheduler (+1.8 ms p50 in one sitting,
        # -0.6 ms in another).
        await asyncio.wait([c.first, c.done], timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if c.first_body is not None:
            times.append(c.first_body - t0)
        c.transport.abort()
        await asyncio.sleep(0.01)
    times.sort()
    return {"p50_ms": _pct(times, 50), "p99_ms": _pct(times, 99), "samples": len(times)}


async def download(url: str) -> dict:
    u = urlparse(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port, limit=1 << 20)
    t0 = time.perf_counter()
    writer.write(f"GET {u.path}?{u.query} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".encode())
    got = 0
    head = await reader.readuntil(b"\r\n\r\n")
    length = _content_length(head)
    while length is None or got < length:
        chunk = await reader.read(1 << 20)
        if not chunk:
            break
        got += len(chunk)
    took = time.perf_counter() - t0
    writer.close()
    return {"bytes": got, "seconds": took, "mb_s": got / took / 1e6, "status": int(head.split()[1])}


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.partition(b":")[2])
    return None


async def upload(url: str, size: int) -> dict:
    u = urlparse(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    block = b"\1" * (256 * 1024)
    t0 = time.perf_counter()
    writer.write(f"POST {u.path} HTTP/1.1\r\nHost: b\r\nContent-Length: {size}\r\n"
                 "Connection: close\r\n\r\n".encode())
    left = size
    while left > 0:
        part = block if left >= len(block) else block[:left]
        writer.write(part)
        left -= len(part)
        await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    resp = head + await reader.readexactly(_content_length(head) or 0)
    took = time.perf_counter() - t0
    writer.close()
    status = int(resp.split()[1]) if resp else 0
    return {"bytes": size, "seconds": took, "mb_s": size / took / 1e6, "status": status,
            "echo": resp.rpartition(b"\r\n\r\n")[2][:20].decode(errors="replace")}


async def idle_connections(url: str, n: int) -> list:
    """Open ``n`` keep-alive connections, one request each; returns them still open."""
    host, port, req = _request(url)
    clients: list[_Client] = []
    sem = asyncio.Semaphore(256)

    async def one() -> None:
        async with sem:
            c = await _connect(host, port)
            await c.get(req)
            clients.append(c)

    await asyncio.gather(*(one() for _ in range(n)))
    return clients
