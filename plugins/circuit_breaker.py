"""circuit_breaker: fail fast while an upstream is down, and let it recover alone.

```toml
[circuit_breaker]
failure_threshold = 5            # consecutive failures that open the circuit
recovery_timeout = "30s"         # open time before a trial request
failure_statuses = [500, 502, 503, 504]
half_open_max = 1                # concurrent trial requests allowed when half-open
failure_ratio = 0.5              # optional: also open at this failure share...
window = "10s"                   # ...over this sliding window...
min_requests = 10                # ...once it holds at least this many requests
```

pybreaker 1.4.1 runs the state machine; this module adds what it lacks for an
event loop: a guard on half-open trials (pybreaker lets every concurrent call
through), a neutral outcome for client disconnects and non-upstream errors
(pybreaker only knows success and failure), the ratio trip, and transitions
shared through Redis pub/sub instead of ``CircuitRedisStorage`` (blocking
calls on the loop). See docs/resilience.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import weakref
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from pybreaker import (STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN, CircuitBreaker,
                       CircuitBreakerError, CircuitBreakerListener, CircuitMemoryStorage)
from pydantic import Field, field_validator, model_validator

from proxy.admin import json_error, json_response, runtime_of
from proxy.chain import Exchange, Filter, Handler, ProxyResponse
from proxy.config import Model
from proxy.errors import SidecarError, UpstreamError
from proxy.hookspecs import hookimpl
from proxy.plugins import BuildContext, PluginSpec
from proxy.units import Duration

if TYPE_CHECKING:
    from aiohttp import web

    from proxy.runtime import Runtime

NAME = "circuit_breaker"
PRIORITY = 700  # inside retry: every attempt counts; outside cache and auth

log = logging.getLogger("sidecar.circuit_breaker")

# The names the admin API and the docs use (pybreaker says "half-open").
STATE_NAMES = {STATE_CLOSED: "closed", STATE_OPEN: "open", STATE_HALF_OPEN: "half_open"}
STATE_VALUES = {STATE_CLOSED: 0, STATE_OPEN: 1, STATE_HALF_OPEN: 2}


class Config(Model):
    failure_threshold: int = Field(default=5, ge=1)
    recovery_timeout: Duration = 30.0
    failure_statuses: list[int] = Field(default_factory=lambda: [500, 502, 503, 504])
    half_open_max: int = Field(default=1, ge=1)
    failure_ratio: float | None = Field(default=None, gt=0, le=1)
    window: Duration = 10.0
    min_requests: int = Field(default=10, ge=1)

    @field_validator("failure_statuses")
    @classmethod
    def _statuses(cls, v: list[int]) -> list[int]:
        for s in v:
            if not 500 <= s <= 599:
                raise ValueError(f"{s} is not a 5xx status: a 4xx is the client's doing, "
                                 "not an upstream failure")
        return v

    @model_validator(mode="after")
    def _durations(self) -> "Config":
        if self.recovery_timeout <= 0:
            raise ValueError("recovery_timeout must be longer than 0")
        if self.window <= 0:
            raise ValueError("window must be longer than 0")
        return self


class CircuitOpen(SidecarError):
    status, code, message = 503, "circuit_open", "circuit breaker open: upstream is failing"


class _FailedStatus(Exception):
    """Raised inside the breaker to record a failure status; carries the response."""

    def __init__(self, resp: ProxyResponse) -> None:
        self.resp = resp


class _Storage(CircuitMemoryStorage):
    """pybreaker's memory storage with a neutral switch.

    pybreaker knows two outcomes; a client that went away (CancelledError) or
    an error that is not the upstream's is neither. Such an outcome is passed
    to pybreaker as an excluded exception (which it counts as a success), with
    ``neutral`` set so that "success" changes no counter: the failure streak
    survives, and a half-open circuit stays half-open.
    """

    def __init__(self) -> None:
        super().__init__(STATE_CLOSED)
        self.neutral = False

    def reset_counter(self) -> None:
        if not self.neutral:
            super().reset_counter()

    def increment_success_counter(self) -> None:
        if not self.neutral:
            super().increment_success_counter()


class _Window:
    """Requests and failures over a sliding window, in ten buckets (O(1) per outcome)."""

    __slots__ = ("span", "buckets", "total", "failed")

    def __init__(self, window: float) -> None:
        self.span = window / 10
        self.buckets: deque[list[int]] = deque()  # [bucket index, total, failed]
        self.total = 0
        self.failed = 0

    def _expire(self, idx: int) -> None:
        b = self.buckets
        while b and b[0][0] <= idx - 10:
            _, t, f = b.popleft()
            self.total -= t
            self.failed -= f

    def add(self, failed: bool, now: float) -> None:
        idx = int(now / self.span)
        self._expire(idx)
        b = self.buckets
        if not b or b[-1][0] != idx:
            b.append([idx, 0, 0])
        last = b[-1]
        last[1] += 1
        self.total += 1
        if failed:
            last[2] += 1
            self.failed += 1

    def counts(self, now: float) -> tuple[int, int]:
        self._expire(int(now / self.span))
        return self.total, self.failed

    def clear(self) -> None:
        self.buckets.clear()
        self.total = self.failed = 0


class Breaker(CircuitBreakerListener):
    """One route's breaker: pybreaker's state machine plus the pieces above."""

    def __init__(self, route: str, config: Config, registry: "Registry") -> None:
        self.route = route
        self.config = config
        self.registry = registry
        self.storage = _Storage()
        self.cb = CircuitBreaker(fail_max=config.failure_threshold, reset_timeout=config.recovery_timeout,
                                 exclude=[self._neutral], listeners=[self], state_storage=self.storage,
                                 name=route, throw_new_error_on_trip=False)
        self.trials = 0            # half-open trial requests in flight
        self.remote = False        # applying a peer sidecar's transition
        self.changed_at = 0.0      # wall time of the last transition (orders peer messages)
        self.reason = ""
        self.window = _Window(config.window) if config.failure_ratio is not None else None

    def _neutral(self, exc: BaseException) -> bool:
        return self.storage.neutral

    @property
    def state(self) -> str:
        return self.storage.state

    def retry_in(self) -> float:
        """Seconds left before an open circuit lets a trial through."""
        opened = self.storage.opened_at
        if opened is None:
            return 0.0
        return opened.timestamp() + self.config.recovery_timeout - time.time()

    # pybreaker listener: called on every transition, on the loop's thread.
    def state_change(self, cb: CircuitBreaker, old_state: Any, new_state: Any) -> None:
        old = STATE_NAMES.get(old_state.name if old_state is not None else STATE_CLOSED, "closed")
        new = STATE_NAMES[new_state.name]
        if old == new:
            return
        self.changed_at = time.time()
        if new_state.name == STATE_CLOSED and self.window is not None:
            self.window.clear()
        reason = self.reason or ("from a peer sidecar" if self.remote else "")
        self.reason = ""
        (log.warning if new == "open" else log.info)(
            "circuit breaker %s: %s -> %s%s", self.route, old, new, f" ({reason})" if reason else "")
        self.registry.transitioned(self, new_state.name)

    def open(self, reason: str) -> None:
        self.reason = reason
        self.cb.open()

    def close(self, reason: str) -> None:
        self.reason = reason
        self.cb.close()

    def apply_remote(self, state: str, opened_at: float | None, at: float) -> None:
        """Take a peer's transition (open or closed) unless ours is newer."""
        if at <= self.changed_at:
            return
        if state == self.state:
            if state == STATE_OPEN and opened_at:
                # A peer's trial failed and reopened: wait from its new opening time.
                self.storage.opened_at = datetime.fromtimestamp(opened_at, UTC)
            self.changed_at = at
            return
        self.remote = True
        try:
            if state == STATE_OPEN:
                self.storage.opened_at = datetime.fromtimestamp(opened_at or at, UTC)
                self.storage.state = STATE_OPEN
                self.cb.state = STATE_OPEN  # pybreaker's setter: new state object + listeners
            elif state == STATE_CLOSED:
                self.cb.close()
        finally:
            self.remote = False
        self.changed_at = at

    def snapshot(self) -> dict[str, Any]:
        state = self.state
        out: dict[str, Any] = {
            "route": self.route,
            "state": STATE_NAMES[state],
            "failures": self.storage.counter,
            "failure_threshold": self.config.failure_threshold,
            "retry_in": round(max(0.0, self.retry_in()), 3) if state == STATE_OPEN else 0.0,
            "half_open_trials": self.trials,
            "half_open_max": self.config.half_open_max,
        }
        if self.window is not None:
            total, failed = self.window.counts(time.monotonic())
            out["window"] = {"requests": total, "failures": failed,
                             "failure_ratio": self.config.failure_ratio,
                             "min_requests": self.config.min_requests, "seconds": self.config.window}
        return out


class CircuitBreakerFilter(Filter):
    def __init__(self, breaker: Breaker) -> None:
        self.breaker = breaker
        c = breaker.config
        self.statuses = frozenset(c.failure_statuses)
        self.half_open_max = c.half_open_max
        self.ratio = c.failure_ratio
        self.min_requests = c.min_requests

    def _refuse(self, b: Breaker) -> CircuitOpen:
        return CircuitOpen(headers={"Retry-After": str(max(1, math.ceil(b.retry_in())))})

    async def handle(self, ex: Exchange, call_next: Handler) -> ProxyResponse:
        b = self.breaker
        storage = b.storage
        state = storage.state
        trial = False
        if state != STATE_CLOSED:
            # pybreaker moves open -> half-open on the first call after the
            # timeout and then lets every concurrent call through; admit
            # exactly half_open_max trials and refuse the rest as open.
            if (state == STATE_OPEN and b.retry_in() > 0) or b.trials >= self.half_open_max:
                ex.log[NAME] = "open"
                raise self._refuse(b)
            trial = True
            b.trials += 1
            ex.log[NAME] = "trial"
        outcome = None  # "failed" | "ok" once the upstream call ran; None when neutral
        try:
            # Around the upstream call up to the response headers only: a body
            # that breaks later is the client's stream, already under way.
            with b.cb.calling():
                try:
                    resp = await call_next(ex)
                except UpstreamError:
                    outcome = "failed"
                    raise
                except BaseException:
                    # Client disconnect, body too large, another filter's error: neutral.
                    storage.neutral = True
                    raise
                if resp.status in self.statuses:
                    outcome = "failed"
                    raise _FailedStatus(resp)
                outcome = "ok"
        except _FailedStatus as f:
            resp = f.resp
        except CircuitBreakerError:
            # pybreaker's clock disagreed with ours at the edge of recovery_timeout.
            ex.log[NAME] = "open"
            raise self._refuse(b) from None
        finally:
            storage.neutral = False
            if trial:
                b.trials -= 1
            if outcome is not None and not trial and b.window is not None:
                self._count(b, outcome == "failed")
        return resp

    def _count(self, b: Breaker, failed: bool) -> None:
        w = b.window
        assert w is not None and self.ratio is not None
        w.add(failed, time.monotonic())
        if failed and b.storage.state == STATE_CLOSED and w.total >= self.min_requests \
                and w.failed >= self.ratio * w.total:
            b.open(f"{w.failed} of {w.total} requests failed in {b.config.window:g}s")

    async def close(self) -> None:
        self.breaker.registry.drop(self.breaker)

    def describe(self) -> dict[str, Any]:
        return {"config": self.breaker.config.model_dump(), "state": STATE_NAMES[self.breaker.state]}


class Registry:
    """The breakers of one runtime, their metric, and the Redis sync (one per runtime)."""

    def __init__(self, runtime: "Runtime") -> None:
        # No reference back to the runtime: it is this registry's weak key.
        self.state_backend = runtime.state
        self.breakers: dict[str, Breaker] = {}
        self.instance = os.urandom(8).hex()
        self.gauge = runtime.metrics.gauge(
            "sidecar_circuit_state", "Circuit breaker state by route: 0 closed, 1 open, 2 half-open.",
            ["route"], multiprocess_mode="liveall")  # a state per worker, not a sum of states
        self.channel = runtime.state.key("breakers")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._follower: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()

    @property
    def shared(self) -> bool:
        return self.state_backend.kind == "redis"

    def add(self, breaker: Breaker) -> None:
        self.breakers[breaker.route] = breaker
        self.gauge.labels(breaker.route).set(STATE_VALUES[breaker.state])
        if self.shared and self._follower is not None:
            # A breaker built by a reload catches up with its peers.
            self._spawn(self._resync([breaker]))

    def drop(self, breaker: Breaker) -> None:
        if self.breakers.get(breaker.route) is breaker:
            del self.breakers[breaker.route]

    def transitioned(self, b: Breaker, state: str) -> None:
        self.gauge.labels(b.route).set(STATE_VALUES[state])
        # Half-open is a local decision (each sidecar sends its own trials);
        # open and closed are shared.
        if self.shared and not b.remote and state != STATE_HALF_OPEN:
            opened = b.storage.opened_at
            msg = orjson.dumps({"from": self.instance, "route": b.route, "state": state,
                                "opened_at": opened.timestamp() if opened else None, "at": b.changed_at})
            self._spawn(self._publish(b.route, msg))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, route: str, msg: bytes) -> None:
        redis = self.state_backend.redis  # type: ignore[union-attr]
        try:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.set(self.state_backend.key("breaker", route), msg, ex=86400)
                pipe.publish(self.channel, msg)
                await pipe.execute()
        except Exception as e:
            log.warning("circuit breaker %s: could not share the transition through Redis: %s",
                        route, type(e).__name__)

    def _apply(self, data: bytes) -> None:
        try:
            m = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if m.get("from") == self.instance:
            return
        b = self.breakers.get(m.get("route"))
        if b is not None and m.get("state") in (STATE_OPEN, STATE_CLOSED):
            b.apply_remote(m["state"], m.get("opened_at"), float(m.get("at") or 0))

    async def _resync(self, breakers: list[Breaker]) -> None:
        """Catch up with transitions published while we were not listening."""
        if not breakers:
            return
        redis = self.state_backend.redis  # type: ignore[union-attr]
        try:
            values = await redis.mget([self.state_backend.key("breaker", b.route) for b in breakers])
        except Exception as e:
            log.warning("circuit breakers: could not read shared state from Redis: %s", type(e).__name__)
            return
        for v in values:
            if v:
                self._apply(v)

    async def follow(self) -> None:
        """Apply peers' transitions as they are published (reconnects with backoff)."""
        redis = self.state_backend.redis  # type: ignore[union-attr]
        delay = 0.1
        while True:
            pubsub = redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                await self._resync(list(self.breakers.values()))
                self.synced.set()
                delay = 0.1
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self._apply(msg["data"])
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.synced.clear()
                log.warning("circuit breakers: Redis subscription lost (%s); retrying in %.1fs",
                            type(e).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                try:
                    await asyncio.shield(pubsub.aclose())
                except Exception:
                    pass

    def start(self) -> None:
        if self.shared and self._follower is None:
            self._follower = asyncio.get_running_loop().create_task(self.follow())

    async def stop(self) -> None:
        tasks = list(self._tasks)
        if self._follower is not None:
            tasks.append(self._follower)
            self._follower.cancel()
            self._follower = None
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass


_registries: "weakref.WeakKeyDictionary[Runtime, Registry]" = weakref.WeakKeyDictionary()


def registry_of(runtime: "Runtime") -> Registry:
    """The runtime's breaker registry (one per runtime, created on first use)."""
    reg = _registries.get(runtime)
    if reg is None:
        reg = _registries[runtime] = Registry(runtime)
    return reg


def build(config: Config, ctx: BuildContext) -> Filter:
    reg = registry_of(ctx.runtime)
    breaker = Breaker(ctx.route, config, reg)
    reg.add(breaker)
    return CircuitBreakerFilter(breaker)


# ---- admin ---------------------------------------------------------------

async def _list(request: "web.Request") -> "web.Response":
    reg = registry_of(runtime_of(request))
    return json_response({name: b.snapshot() for name, b in sorted(reg.breakers.items())})


async def _reset(request: "web.Request") -> "web.Response":
    reg = registry_of(runtime_of(request))
    name = request.match_info["policy"]
    b = reg.breakers.get(name)
    if b is None:
        return json_error(404, "no_breaker", f"no circuit breaker for policy {name!r}")
    if b.state != STATE_CLOSED:
        b.close("reset by an operator")
    b.storage.reset_counter()
    if b.window is not None:
        b.window.clear()
    return json_response({name: b.snapshot()})


@hookimpl
def sidecar_admin_routes(runtime: "Runtime", app: "web.Application") -> None:
    app.router.add_get("/admin/breakers", _list)
    app.router.add_post("/admin/breakers/{policy}/reset", _reset)


@hookimpl
def sidecar_runtime_startup(runtime: "Runtime") -> None:
    reg = registry_of(runtime)
    reg.start()
    runtime.on_shutdown(reg.stop)


@hookimpl
def sidecar_plugins_register() -> list[PluginSpec]:
    return [PluginSpec(NAME, Config, PRIORITY, build,
                       description="open the circuit on upstream failures; fail fast while open")]
