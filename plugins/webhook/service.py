"""The runtime's webhook side: endpoints, the queue and one delivery loop per source."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from typing import TYPE_CHECKING, Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import config_digest
from proxy.inbound import inbound_of

from .endpoint import WebhookEndpoint
from .queue import Event
from .redis_queue import RedisQueue
from .sqlite_queue import SqliteQueue

if TYPE_CHECKING:
    from proxy.config import Policy
    from proxy.runtime import Runtime

log = logging.getLogger("sidecar.webhook")

NAME = "webhook"
POLL = 0.25           # how often an idle loop looks at the queue (other workers/sidecars enqueue too)
STATS_EVERY = 1.0     # queue depth / oldest age gauges refresh
PRUNE_EVERY = 600.0
RESPONSE_LIMIT = 1024 * 1024


class WebhookMetrics:
    def __init__(self, rt: "Runtime") -> None:
        m = rt.metrics
        self.received = m.counter("sidecar_webhook_received", "Webhooks verified, by source.", ["source"])
        self.rejected = m.counter("sidecar_webhook_rejected", "Webhooks rejected, by source and reason.",
                                  ["source", "reason"])
        self.duplicates = m.counter("sidecar_webhook_duplicates", "Duplicate webhooks answered 200, by source.",
                                    ["source"])
        self.delivered = m.counter("sidecar_webhook_delivered", "Webhooks delivered to the service, by source.",
                                   ["source"])
        self.failed = m.counter("sidecar_webhook_passthrough_failed",
                                "Passthrough webhooks the service did not accept (2xx), by source.", ["source"])
        self.retried = m.counter("sidecar_webhook_retried", "Delivery attempts scheduled again, by source.",
                                 ["source"])
        self.dead = m.counter("sidecar_webhook_dead", "Webhooks dead-lettered, by source.", ["source"])
        self.depth = m.gauge("sidecar_webhook_queue_depth", "Pending webhooks in the queue, by source.", ["source"])
        self.oldest = m.gauge("sidecar_webhook_queue_oldest_age_seconds",
                              "Age of the oldest pending webhook, by source.", ["source"])


class Waker:
    """Wakes a sleeping delivery loop early (a new or retried event).

    A plain future rather than ``asyncio.wait_for(event.wait(), t)``: on
    Python 3.11 wait_for can swallow a cancellation that lands as its timeout
    fires (gh-86296), and the loop would then never stop.
    """

    __slots__ = ("_fut", "_flag")

    def __init__(self) -> None:
        self._fut: asyncio.Future[None] | None = None
        self._flag = False

    def set(self) -> None:
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(None)
        else:
            self._flag = True

    async def nap(self, timeout: float) -> None:
        if self._flag:
            self._flag = False
            return
        loop = asyncio.get_running_loop()
        fut = self._fut = loop.create_future()
        handle = loop.call_later(timeout, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            handle.cancel()
            self._fut = None


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: between half and all of min(cap, base * 2^(attempt-1))."""
    delay = min(cap, base * (2 ** min(attempt - 1, 60)))
    return random.uniform(delay / 2, delay)


class WebhookService:
    def __init__(self, rt: "Runtime") -> None:
        self.rt = rt
        self.m = WebhookMetrics(rt)
        self.endpoints: dict[str, WebhookEndpoint] = {}   # by source (policy name)
        self.queue: SqliteQueue | RedisQueue | None = None
        self.session: aiohttp.ClientSession | None = None
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.wake: dict[str, Waker] = {}
        self.started = False
        self._stopping = False
        self._prune: asyncio.Task[None] | None = None
        self._open_lock: asyncio.Lock | None = None

    # ---- control plane ----------------------------------------------------

    def update(self, policies: list["Policy"]) -> None:
        """Rebuild the endpoints from a new policy set; unchanged ones are kept."""
        inbound = inbound_of(self.rt)
        now: dict[str, WebhookEndpoint] = {}
        paths: dict[str, str] = {}
        for p in policies:
            config = p.plugins.get(NAME)
            if config is None:
                continue
            path = config.path
            if path in paths:
                log.error("%s: webhook.path: %r is already the webhook path of policy %s; ignored",
                          p.file, path, paths[path])
                continue
            if config.publish and self.rt.state.redis is None:
                log.error("%s: webhook.publish: needs the redis state backend; not publishing", p.file)
            paths[path] = p.name
            digest = config_digest(p.raw.get(NAME))
            old = self.endpoints.get(p.name)
            now[p.name] = old if old is not None and old.digest == digest else WebhookEndpoint(self, p.name, config, digest)
        self.endpoints = now
        inbound.endpoints.clear()
        inbound.endpoints.update({ep.config.path: ep for ep in now.values()})
        if self.started:
            self._sync_loops()

    async def start(self) -> None:
        self.started = True
        if self.endpoints or inbound_of(self.rt).configured:
            await self._ensure_queue()
        self._sync_loops()

    async def _ensure_queue(self) -> None:
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self.queue is not None:
                return
            rt = self.rt
            if rt.state.redis is not None:
                consumer = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
                queue: SqliteQueue | RedisQueue = RedisQueue(rt.state, consumer)
            else:
                queue = SqliteQueue(inbound_of(rt).data_dir / "webhooks.sqlite3", deliver=rt.worker_id == 0)
            await queue.open()
            self.session = aiohttp.ClientSession(
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Accept", "Content-Type"))
            self.queue = queue
            self._prune = asyncio.create_task(self._pruner())
            log.info("webhook queue: %s", queue.kind)

    def _sync_loops(self) -> None:
        want = {s for s, ep in self.endpoints.items() if ep.durable}
        for source in list(self.tasks):
            if source not in want:
                self.tasks.pop(source).cancel()
        for source in want - set(self.tasks):
            self.wake.setdefault(source, Waker())
            self.tasks[source] = asyncio.create_task(self._loop(source), name=f"webhook-delivery-{source}")

    async def stop(self) -> None:
        self.started = False
        # The flag as well as cancel(): a client library may swallow a
        # cancellation that lands mid-call (redis-py's timeouts can), and
        # the loop must end anyway.
        self._stopping = True
        tasks = list(self.tasks.values())
        if self._prune is not None:
            tasks.append(self._prune)
        for w in self.wake.values():
            w.set()
        for t in tasks:
            t.cancel()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=5.0)
            if late:
                log.warning("%d webhook task(s) did not stop in time", len(late))
        self.tasks.clear()
        if self.queue is not None:
            await self.queue.close()
            self.queue = None
        if self.session is not None:
            await self.session.close()
            self.session = None

    # ---- data plane -------------------------------------------------------

    async def enqueue(self, ev: Event) -> None:
        if self.queue is None:
            await self._ensure_queue()
        assert self.queue is not None
        await self.queue.add(ev)
        w = self.wake.get(ev.source)
        if w is not None:
            w.set()

    async def send(self, ep: WebhookEndpoint, ev: Event, attempt: int) -> tuple[int, CIMultiDictProxy[str], bytes]:
        """One delivery attempt: the original method, body and headers plus the event id and attempt."""
        if self.session is None:
            await self._ensure_queue()
        assert self.session is not None
        url = inbound_of(self.rt).settings.service_url + ep.config.target
        if ev.query:
            url += "?" + ev.query
        headers = CIMultiDict(ev.headers)
        headers["X-Sidecar-Event-Id"] = ev.id
        headers["X-Sidecar-Attempt"] = str(attempt)
        async with self.session.request(ev.method, URL(url, encoded=True), headers=headers, data=ev.body,
                                        allow_redirects=False,
                                        timeout=aiohttp.ClientTimeout(total=ep.config.timeout)) as r:
            return r.status, r.headers, await _read_upto(r.content, RESPONSE_LIMIT)

    async def _loop(self, source: str) -> None:
        wake = self.wake[source]
        next_stats = 0.0
        while not self._stopping:
            try:
                ep = self.endpoints.get(source)
                if ep is None or self.queue is None:
                    return
                ev = await self.queue.head(source)
                if time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + STATS_EVERY
                    await self._stats(source)
                wait = POLL if ev is None else ev.next_at - time.time()
                if wait > 0:
                    await wake.nap(min(wait, POLL))
                    continue
                assert ev is not None
                await self._deliver(ep, ev)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self._stopping:
                    return
                log.warning("webhook delivery loop for %s: %s: %s; retrying in 1s", source, type(e).__name__, e)
                log.debug("delivery loop failure", exc_info=True)
                await asyncio.sleep(1.0)

    async def _stats(self, source: str) -> None:
        assert self.queue is not None
        if not self.queue.deliver:
            return
        depth, oldest = await self.queue.stats(source)
        self.m.depth.labels(source).set(depth)
        self.m.oldest.labels(source).set(max(0.0, time.time() - oldest) if oldest else 0.0)

    async def _deliver(self, ep: WebhookEndpoint, ev: Event) -> None:
        assert self.queue is not None
        attempt = ev.attempts + 1
        retry = ep.config.retry
        try:
            status, _, _ = await self.send(ep, ev, attempt)
            error = None if 200 <= status < 300 else f"service answered {status}"
            retryable = status >= 500 or status in (408, 429)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            status, retryable = None, True
            error = "timeout" if isinstance(e, asyncio.TimeoutError) else f"connection failed: {type(e).__name__}"
        ev.attempts, ev.last_status, ev.last_error = attempt, status, error
        if error is None:
            ev.status, ev.delivered_at = "delivered", time.time()
            await self.queue.save(ev)
            self.m.delivered.labels(ev.source).inc()
            if ep.config.publish:
                await self._publish(ev)
        elif retryable and attempt < retry.attempts:
            ev.next_at = time.time() + backoff(attempt, retry.base, retry.max)
            await self.queue.save(ev)
            self.m.retried.labels(ev.source).inc()
        else:
            ev.status = "dead"
            await self.queue.save(ev)
            self.m.dead.labels(ev.source).inc()
            log.error("webhook %s event %s dead after %d attempt(s): %s", ev.source, ev.id, attempt, error)

    async def _publish(self, ev: Event) -> None:
        redis = self.rt.state.redis
        if redis is None:
            return
        try:
            await redis.xadd(f"webhook.{ev.source}.{ev.type}",
                             {"id": ev.id, "source": ev.source, "type": ev.type,
                              "provider_id": ev.provider_id or "", "body": ev.body,
                              "received_at": repr(ev.received_at)},
                             maxlen=100_000, approximate=True)
        except Exception as e:
            log.warning("webhook %s: publishing event %s failed: %s", ev.source, ev.id, type(e).__name__)

    async def _pruner(self) -> None:
        retention = inbound_of(self.rt).settings.retention
        while True:
            await asyncio.sleep(PRUNE_EVERY)
            if self.queue is not None and self.queue.deliver:
                try:
                    await self.queue.prune(time.time() - retention)
                except Exception:
                    log.exception("pruning delivered webhooks failed")

    def describe(self) -> dict[str, Any]:
        return {"queue": None if self.queue is None else self.queue.kind,
                "endpoints": [ep.describe() for ep in self.endpoints.values()]}


async def _read_upto(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to ``limit`` bytes; ``read(n)`` alone returns only what has
    arrived so far (the first chunk of a chunked answer)."""
    buf = bytearray()
    while len(buf) < limit:
        chunk = await content.read(limit - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)
