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

from proxy.body import read_limited
from proxy.config import Policy, config_digest
from proxy.errors import ConfigError, RouteDisabled, UpstreamUnavailable
from proxy.inbound import inbound_of

from .config import Config as WebhookConfig
from .config import WebhookSettings
from .endpoint import WebhookEndpoint
from .queue import Event
from .redis_queue import RedisQueue
from .sqlite_queue import SqliteQueue

if TYPE_CHECKING:
    from proxy.routes import Route
    from proxy.runtime import Runtime

log = logging.getLogger("sidecar.webhook")


async def _disabled(ex: Any) -> Any:
    raise RouteDisabled()

NAME = "webhook"
POLL = 0.25           # how often an idle loop looks at the queue (other workers/sidecars enqueue too)
STATS_EVERY = 1.0     # queue depth / oldest age gauges refresh
PRUNE_EVERY = 600.0
RESPONSE_LIMIT = 1024 * 1024  # a passthrough answer relayed to the provider
DEFAULT_DATA_DIR = "data"
DEFAULT_RETENTION = 7 * 86400.0


class AnswerTooLarge(UpstreamUnavailable):
    message = "the service's answer to a webhook is larger than 1 MiB"


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
        handle = loop.call_later(timeout, lambda: None if fut.done() else fut.set_result(None))
        try:
            await fut
        finally:
            handle.cancel()
            self._fut = None


def _config(p: Policy) -> WebhookConfig | None:
    """The policy's validated ``[webhook]`` table, if any."""
    config = p.plugins.get(NAME)
    return config if isinstance(config, WebhookConfig) else None


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: between half and all of min(cap, base * 2^(attempt-1))."""
    delay = min(cap, base * (2 ** min(attempt - 1, 60)))
    return random.uniform(delay / 2, delay)  # noqa: S311 -- jitter, not a secret


class WebhookService:
    def __init__(self, rt: "Runtime") -> None:
        self.rt = rt
        self.m = WebhookMetrics(rt)
        own = rt.extra_settings.get(NAME)
        own = own if isinstance(own, WebhookSettings) else WebhookSettings()
        legacy = inbound_of(rt).settings  # [inbound] data_dir / retention, still honoured
        self.data_dir = (rt.settings.base_dir / (own.data_dir or legacy.data_dir or DEFAULT_DATA_DIR)).resolve()
        self.retention = next(v for v in (own.retention, legacy.retention, DEFAULT_RETENTION) if v is not None)
        self.endpoints: dict[str, WebhookEndpoint] = {}   # by source (policy name)
        # Endpoints of the policy set being compiled; adopted once it is live.
        self._candidate: dict[str, WebhookEndpoint] | None = None
        self.queue: SqliteQueue | RedisQueue | None = None
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.wake: dict[str, Waker] = {}
        self.started = False
        self._stopping = False
        self._prune: asyncio.Task[None] | None = None
        self._open_lock: asyncio.Lock | None = None

    # ---- control plane ----------------------------------------------------

    def build_routes(self, policies: list[Policy], build: Any) -> list["Route"]:
        """One exact route per ``[webhook]`` on the inbound listener, the
        endpoint as its terminal handler. Unchanged endpoints are kept.

        The route's plugins are the policy's inbound-capable tables. In a
        policy that also has an outbound route, tables usable both ways
        (rate_limit, headers, tracing...) stay with the outbound route: give
        the webhook a policy file of its own to wrap it in plugins.
        """
        now: dict[str, WebhookEndpoint] = {}
        routes = []
        specs = self.rt.specs
        for p in policies:
            config = _config(p)
            if config is None:
                continue
            digest = config_digest(p.raw.get(NAME))
            old = self.endpoints.get(p.name)
            try:
                ep = now[p.name] = old if old is not None and old.digest == digest else \
                    WebhookEndpoint(self, p.name, config, digest)
            except ValueError as e:   # a secret reference no source can read
                raise ConfigError([f"{p.file}: webhook.secrets: {e}"]) from None
            mixed = p.core.route is not None
            plugins = {n: c for n, c in p.plugins.items()
                       if n != NAME and (specs[n].scope == "inbound" or (specs[n].scope == "both" and not mixed))}
            # The route's own limits: the webhook's max_body bounds the body.
            limits = p.core.limits.model_copy(update={"max_request_body": config.max_body})
            core = p.core.model_copy(update={"limits": limits, "route": None, "upstream": None})
            if not p.core.enabled:
                # enabled = false turns the whole policy off, its webhook too
                # (503 route_disabled: the provider retries later); events
                # already accepted are still delivered.
                plugins = {}
            policy = Policy(f"webhook:{p.name}", p.file, core, plugins,
                            {k: v for k, v in p.raw.items() if k in plugins})
            routes.append(build(policy, plugins, prefix=config.path, scope="inbound",
                                terminal=ep if p.core.enabled else _disabled, where=str(p.file), exact=True))
        self._candidate = now
        return routes

    def update(self, policies: list["Policy"]) -> None:
        """The policy set is live: adopt its endpoints, start or stop delivery loops."""
        # Built by build_routes while this set was compiled.
        now = self._candidate if self._candidate is not None else self.endpoints
        self._candidate = None
        for p in policies:
            config = _config(p)
            if config is not None and config.publish and self.rt.state.redis is None:
                log.error("%s: webhook.publish: needs the redis state backend; not publishing", p.file)
        self.endpoints = now
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
                queue = SqliteQueue(self.data_dir / "webhooks.sqlite3", deliver=rt.worker_id == 0)
            await queue.open()
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

    # ---- data plane -------------------------------------------------------

    async def enqueue(self, ev: Event) -> None:
        if self.queue is None:
            await self._ensure_queue()
        assert self.queue is not None
        await self.queue.add(ev)
        w = self.wake.get(ev.source)
        if w is not None:
            w.set()

    async def send(self, ep: WebhookEndpoint, ev: Event, attempt: int, *,
                   want_body: bool = True) -> tuple[int, CIMultiDictProxy[str], bytes]:
        """One delivery attempt: the original method, body and headers plus the
        event id and attempt, through the runtime's shared HTTP client."""
        url = inbound_of(self.rt).settings.service_url + ep.config.target
        if ev.query:
            url += "?" + ev.query
        headers = CIMultiDict(ev.headers)
        headers["X-Sidecar-Event-Id"] = ev.id
        headers["X-Sidecar-Attempt"] = str(attempt)
        async with self.rt.http.request(ev.method, URL(url, encoded=True), headers=headers, data=ev.body,
                                        timeout=aiohttp.ClientTimeout(total=ep.config.timeout)) as r:
            # A queued delivery needs the status only; a passthrough relays the body.
            body = await read_limited(r.content, RESPONSE_LIMIT, AnswerTooLarge) if want_body else b""
            return r.status, r.headers, body

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
        # The attempt is stored before the service sees it: after a crash
        # mid-delivery the redelivery says X-Sidecar-Attempt: 2, so the
        # service can tell it may have seen this event (issue 11, item 8).
        ev.attempts = attempt
        await self.queue.save(ev)
        try:
            status, _, _ = await self.send(ep, ev, attempt, want_body=False)
            error = None if 200 <= status < 300 else f"service answered {status}"
            retryable = status >= 500 or status in (408, 429)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            status, retryable = None, True
            error = "timeout" if isinstance(e, asyncio.TimeoutError) else f"connection failed: {type(e).__name__}"
        ev.last_status, ev.last_error = status, error
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
        retention = self.retention
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
