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

import math
import time
from typing import TYPE_CHECKING, Any

from pybreaker import STATE_CLOSED, STATE_OPEN, CircuitBreakerError

from proxy.admin import json_error, json_response, runtime_of
from proxy.chain import Defer, Exchange, Filter, Handler, ProxyResponse
from proxy.errors import CircuitOpen, UpstreamError
from proxy.hookspecs import hookimpl
from proxy.plugins import BuildContext, PluginSpec

from .breaker import STATE_NAMES, Breaker, _Window
from .config import Config
from .shared import Registry, registry_of

if TYPE_CHECKING:
    from aiohttp import web

    from proxy.runtime import Runtime

__all__ = ["Breaker", "CircuitOpen", "Config", "Registry", "_Window", "registry_of"]

NAME = "circuit_breaker"
PRIORITY = 700  # inside retry (every attempt counts) and the cache; outside auth


class _FailedStatus(Exception):
    """Raised inside the breaker to record a failure status; carries the response."""

    def __init__(self, resp: ProxyResponse) -> None:
        self.resp = resp


class CircuitBreakerFilter(Filter):
    def __init__(self, breaker: Breaker) -> None:
        self.breaker = breaker
        c = breaker.config
        self.statuses = frozenset(c.failure_statuses)
        self.half_open_max = c.half_open_max
        self.ratio = c.failure_ratio
        self.min_requests = c.min_requests
        self._defer = Defer(self.handle)

    # Closed with no failure streak (the common case) is a sync layer
    # (proxy/chain.py): before() lets the request through, after() and
    # after_error() record the outcome. Every other state takes handle().
    sync = True

    def before(self, ex: Exchange) -> Defer | None:
        storage = self.breaker.storage
        if storage.state == STATE_CLOSED and storage.counter == 0:
            return None
        return self._defer

    def after(self, ex: Exchange, resp: ProxyResponse) -> None:
        b = self.breaker
        if resp.status in self.statuses:
            self._record_failure(b, _FailedStatus(resp))
        elif b.window is not None:
            self._count(b, False)

    def after_error(self, ex: Exchange, exc: BaseException) -> None:
        if isinstance(exc, UpstreamError):
            self._record_failure(self.breaker, exc)

    def _refuse(self, b: Breaker) -> CircuitOpen:
        return CircuitOpen(headers={"Retry-After": str(max(1, math.ceil(b.retry_in())))})

    async def handle(self, ex: Exchange, call_next: Handler) -> ProxyResponse:
        b = self.breaker
        storage = b.storage
        state = storage.state
        if state == STATE_CLOSED and storage.counter == 0:
            return await self._healthy(ex, call_next)
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

    async def _healthy(self, ex: Exchange, call_next: Handler) -> ProxyResponse:
        """Closed with no failure streak: the common case, without pybreaker's
        ~10 µs ``calling()`` per request (measured). A success there would
        record nothing (the streak is already 0), so only a failure is handed
        to pybreaker, after the fact, with the same effect on its counters."""
        try:
            resp = await call_next(ex)
        except BaseException as e:
            self.after_error(ex, e)
            raise
        self.after(ex, resp)
        return resp

    def _record_failure(self, b: Breaker, exc: Exception) -> None:
        try:
            with b.cb.calling():
                raise exc
        except CircuitBreakerError:
            pass  # another request opened the circuit meanwhile
        except Exception as e:
            if e is not exc:
                raise
        if b.window is not None:
            self._count(b, True)

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
    else:
        # Closed here, maybe not on every peer: share the reset all the same.
        b.changed_at = time.time()
        reg.transitioned(b, STATE_CLOSED)
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
