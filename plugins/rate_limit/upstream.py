"""Pacing to the provider's own quota: ``[rate_limit.upstream]`` (issue 13).

Providers say in each response how much quota is left and when it resets
(OpenAI ``x-ratelimit-remaining-requests`` + ``x-ratelimit-reset-requests:
6m0s``, Anthropic ``anthropic-ratelimit-*`` with RFC 3339 times, GitHub
``x-ratelimit-remaining`` + epoch ``x-ratelimit-reset``, the IETF
``RateLimit`` header). When a response says ``remaining <= reserve`` until a
reset, or the upstream answers 429 with ``Retry-After``, the route (or the
rate-limit key's share of it) is *blocked until* that moment: later requests
wait for it in queue mode, else get the sidecar's 429
``upstream_quota_exhausted`` with ``Retry-After``, and never reach the
provider meanwhile. The provider's own 429 reaches the client as it is.

Where the learned block lives: in memory per process, or in Redis (one key
per route and key value, expiring at the reset: ``PTTL`` on the Redis
server's clock, so sidecars with skewed clocks still agree). With Redis a
request reads one ``PTTL`` while the route is open; while it is blocked the
local copy answers without a round trip.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, model_validator

from proxy.chain import Exchange, Handler, ProxyResponse
from proxy.config import Model
from proxy.errors import SidecarError
from proxy.units import Duration

from .quota_headers import UNSCOPED, Signals, github_resource

log = logging.getLogger("sidecar.rate_limit")

ResetFormat = Literal["epoch", "seconds", "duration", "rfc3339"]

# Learned blocks one process keeps at most (client-chosen key values must not
# grow it without bound); expired ones are swept first.
MAX_LOCAL_KEYS = 1 << 16


class UpstreamQuotaExhausted(SidecarError):
    status, code, message = 429, "upstream_quota_exhausted", "the provider's quota is exhausted until its reset"


class UpstreamQuota(Model):
    """``[rate_limit.upstream]``."""

    # Every preset also honours a 429's Retry-After; "retry_after" reads nothing
    # else (providers that announce no quota: Notion, Slack, Twilio, Google).
    preset: Literal["openai", "anthropic", "github", "ietf", "retry_after", "custom"]
    # preset = "custom": the two header names and how the reset reads.
    remaining: str | None = None
    reset: str | None = None
    reset_format: ResetFormat | None = None
    # Hold back while remaining <= reserve (leave room for other clients of the same key).
    reserve: int = Field(default=0, ge=0)
    # Longest block one response may impose: a misread reset (an epoch taken as
    # seconds) must not close a route for years.
    max_block: Duration = 3600.0

    @model_validator(mode="after")
    def _custom(self) -> "UpstreamQuota":
        names = ("remaining", "reset", "reset_format")
        given = [n for n in names if getattr(self, n) is not None]
        if self.preset == "custom":
            missing = [n for n in names if getattr(self, n) is None]
            if missing:
                raise ValueError(f"preset = \"custom\" needs {', '.join(missing)}")
        elif given:
            raise ValueError(f"{', '.join(given)}: only for preset = \"custom\" "
                             f"(preset {self.preset!r} knows its headers)")
        if self.max_block <= 0:
            raise ValueError("max_block must be greater than zero")
        return self


# ---- where learned blocks live ----------------------------------------------

class LocalBlocks:
    """Blocks this process knows: key -> (monotonic until, wall until, reason)."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[float, float, str]] = {}

    def left(self, key: str, now: float) -> float:
        item = self.items.get(key)
        if item is None:
            return 0.0
        left = item[0] - now
        if left <= 0:
            del self.items[key]
            return 0.0
        return left

    def put(self, key: str, seconds: float, reason: str, now: float) -> None:
        cur = self.items.get(key)
        if cur is not None and cur[0] >= now + seconds:
            return
        if len(self.items) >= MAX_LOCAL_KEYS:
            self.sweep(now)
            if len(self.items) >= MAX_LOCAL_KEYS:
                # Drop the one nearest its end: it would be gone soonest anyway.
                del self.items[min(self.items, key=lambda k: self.items[k][0])]
        self.items[key] = (now + seconds, time.time() + seconds, reason)

    def sweep(self, now: float) -> None:
        for k in [k for k, v in self.items.items() if v[0] <= now]:
            del self.items[k]

    def listing(self, now: float) -> list[dict[str, Any]]:
        self.sweep(now)
        return [{"key": k, "blocked_for_seconds": round(v[0] - now, 3), "until": round(v[1], 3), "reason": v[2]}
                for k, v in sorted(self.items.items())]


# KEYS[1]: the block; ARGV[1]: milliseconds; ARGV[2]: the reason. Only ever
# lengthens a block (two sidecars learning different resets keep the later).
_LEARN = """
local cur = redis.call('PTTL', KEYS[1])
if cur < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
end
return 1
"""


# KEYS[1]: a route's index of blocks (sorted set: key value -> wall-clock ms of
# its end); ARGV: key value, end ms, now ms, ms the index must outlive. The
# admin listing reads it instead of scanning the keyspace (which a shared
# Redis fills with millions of other keys). A separate key from the block:
# each script touches one key, so no hash tag ties a route's blocks to one slot.
_INDEX = """
local cur = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not cur or tonumber(cur) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return 1
"""


class RedisBlocks:
    """Blocks shared by every sidecar on the Redis (``runtime.state.redis``)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.script = client.register_script(_LEARN)
        self.index_script = client.register_script(_INDEX)

    async def left(self, keys: tuple[str, ...]) -> tuple[float, str, int]:
        """The longest block among ``keys`` (one round trip), its reason and index."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.pttl(key)
            pipe.get(key)
        answers = await pipe.execute()
        best, reason, which = 0, None, 0
        for i, (ms, why) in enumerate(zip(answers[::2], answers[1::2])):
            if ms is not None and ms > best:
                best, reason, which = ms, why, i
        if best <= 0:
            return 0.0, "", 0
        return best / 1000.0, (reason or b"").decode("utf-8", "replace"), which

    async def put(self, prefix: str, key: str, seconds: float, reason: str, index: str) -> None:
        ms = max(1, math.ceil(seconds * 1000))
        await self.script(keys=[prefix + key], args=[ms, reason])
        now_ms = int(time.time() * 1000)
        # Clocks of sidecars differ: the index only finds candidates, the
        # blocks' own PTTL (the Redis clock) decides; it outlives them by a minute.
        await self.index_script(keys=[index], args=[key, now_ms + ms, now_ms - 60_000, ms + 60_000])

    async def listing(self, prefix: str, index: str) -> list[dict[str, Any]]:
        now = time.time()
        members = await self.client.zrangebyscore(index, int(now * 1000) - 60_000, "+inf", start=0, num=1000)
        keys = [m.decode("utf-8", "surrogateescape") if isinstance(m, bytes) else m for m in members]
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.pttl(prefix + key)
            pipe.get(prefix + key)
        answers = await pipe.execute()
        out = []
        for key, ms, reason in zip(keys, answers[::2], answers[1::2]):
            if ms is not None and ms > 0:
                secs = ms / 1000.0
                out.append({"key": key, "blocked_for_seconds": round(secs, 3), "until": round(now + secs, 3),
                            "reason": (reason or b"").decode("utf-8", "replace")})
        return sorted(out, key=lambda d: d["key"])


# ---- the pacer the rate-limit filter runs around the upstream ---------------

class UpstreamPacer:
    def __init__(self, route: str, config: UpstreamQuota, key_of: Callable[[Exchange], str] | None,
                 queue: bool, max_wait: float, enforce: bool, prefix: str, shared: RedisBlocks | None,
                 counter: Any, backend_errors: Any, backend_errors_ok: tuple[type[BaseException], ...],
                 index: str) -> None:
        self.route = route
        self.config = config
        self.signals = Signals(config)
        self.key_of = key_of
        self.queue = queue
        self.max_wait = max_wait
        self.enforce = enforce
        self.prefix = prefix
        self.index = index   # outside ``prefix``: no client key value can name it
        self.local = LocalBlocks()
        self.shared = shared
        self.counter = counter          # result -> counter child
        self.backend_errors = backend_errors
        self.errors = backend_errors_ok
        self._last_warning = 0.0

    async def _left(self, keys: tuple[str, ...]) -> float:
        now = time.monotonic()
        left = max(self.local.left(key, now) for key in keys)
        if left > 0 or self.shared is None:
            return left
        try:
            left, reason, which = await self.shared.left(tuple(self.prefix + key for key in keys))
        except self.errors as e:
            self._backend_down(e)
            return 0.0
        if left > 0:
            # Learned by another sidecar: keep a local copy so the requests
            # behind this one do not ask Redis again until the reset.
            self.local.put(keys[which], left, reason, now)
        return left

    async def handle(self, ex: Exchange, call_next: Handler) -> ProxyResponse:
        key = self.key_of(ex) if self.key_of is not None else "-"
        # github: a request waits only for its own resource's block and for
        # blocks that hold for all ("<resource>/<key>"; a resource has no "/").
        keys = (f"{github_resource(ex.path)}/{key}", f"{UNSCOPED}/{key}") if self.signals.by_resource else (key,)
        left = await self._left(keys)
        if left > 0:
            await self._wait_or_refuse(ex, keys, left)
        resp = await call_next(ex)
        if resp.upstream and not resp.headers.get("X-Cache", "").startswith(("HIT", "STALE")):
            secs, why, scope = self.signals.block_scoped(resp.status, resp.headers, time.time())
            if secs > 0:
                await self._learn(f"{scope}/{key}" if self.signals.by_resource else key, secs, why)
        return resp

    async def _wait_or_refuse(self, ex: Exchange, keys: tuple[str, ...], left: float) -> None:
        if not self.enforce:
            self.counter["shadow_rejected"].inc()
            ex.log["upstream_quota"] = {"result": "shadow_rejected", "blocked_ms": round(left * 1000)}
            return
        if self.queue:
            end = time.monotonic() + self.max_wait
            if ex.deadline is not None:
                end = min(end, ex.deadline)
            waited = 0.0
            while left > 0 and time.monotonic() + left <= end:
                await asyncio.sleep(left)
                waited += left
                left = await self._left(keys)   # another response may have moved the reset
            if left <= 0:
                self.counter["queued"].inc()
                ex.log["upstream_quota"] = {"result": "queued", "wait_ms": round(waited * 1000, 1)}
                return
        self.counter["rejected"].inc()
        ex.log["upstream_quota"] = {"result": "rejected", "blocked_ms": round(left * 1000)}
        raise UpstreamQuotaExhausted(
            f"the provider's quota for this route is exhausted for {left:.1f}s more",
            headers={"Retry-After": str(max(1, math.ceil(left)))})

    async def _learn(self, key: str, secs: float, why: str) -> None:
        self.counter["learned"].inc()
        log.info("route %s: provider quota exhausted for %.1fs (%s)", self.route, secs, why)
        self.local.put(key, secs, why, time.monotonic())
        if self.shared is not None:
            try:
                await self.shared.put(self.prefix, key, secs, why, self.index)
            except self.errors as e:
                self._backend_down(e)

    def _backend_down(self, err: BaseException) -> None:
        self.backend_errors.inc()
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            log.warning("route %s: rate-limit backend unavailable (%s); pacing on what this sidecar "
                        "learned itself", self.route, type(err).__name__)

    async def describe(self) -> dict[str, Any]:
        c = self.config
        out: dict[str, Any] = {"preset": c.preset, "reserve": c.reserve, "max_block": c.max_block,
                               "signals": self.signals.describe, "shared": self.shared is not None}
        if self.shared is not None:
            try:
                out["learned"] = await self.shared.listing(self.prefix, self.index)
                return out
            except self.errors:
                out["shared_error"] = "the rate-limit backend is unavailable; showing this sidecar's view"
        out["learned"] = self.local.listing(time.monotonic())
        return out
