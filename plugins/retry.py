"""retry: retry transient upstream failures, safely and within a budget.

```toml
[retry]
attempts = 3                                  # total tries, the first included
backoff = { base = "100ms", max = "2s" }      # exponential with full jitter
on = ["connect_error", "timeout", 502, 503, 504, 429]
idempotency_header = "Idempotency-Key"
add_idempotency_key = false                   # add a generated key to POSTs without one
max_replay_body = "1MB"                       # larger request bodies are sent once
per_try_timeout = "0s"                        # 0: each try is bounded by [timeouts] total only
budget_percent = 20                           # retries add at most 20% to the route's traffic
budget_min_retries = 3                        # ...but this many per window are always allowed
budget_window = "10s"
```

Only idempotent methods are retried, or requests carrying an idempotency key,
so a POST is never sent twice by accident. A retry happens before any
response byte reaches the client: the response of a failed try is dropped
(closed, its connection not reused) and never streamed. See docs/resilience.md.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator, model_validator
from prometheus_client import Counter

from proxy.chain import Again, Defer, Exchange, Filter, Handler, ProxyResponse
from proxy.config import Model
from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from proxy.hookspecs import hookimpl
from proxy.http import check_header_name, retry_after
from proxy.plugins import BuildContext, PluginSpec
from proxy.units import Duration, Size

if TYPE_CHECKING:
    from proxy.metrics import Metrics

NAME = "retry"
PRIORITY = 750  # outside the breaker (each try counts there), inside fallback

log = logging.getLogger("sidecar.retry")

# RFC 9110 9.2.2: methods whose repetition has the effect of one request.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
CONDITIONS = ("connect_error", "timeout")


class Backoff(Model):
    base: Duration = 0.1
    max: Duration = 2.0

    @model_validator(mode="after")
    def _order(self) -> "Backoff":
        if self.max < self.base:
            raise ValueError("max must not be shorter than base")
        return self


_RETRY_ON: tuple[str | int, ...] = ("connect_error", "timeout", 502, 503, 504, 429)


class Config(Model):
    attempts: int = Field(default=3, ge=1, le=10)
    backoff: Backoff = Backoff()
    on: list[str | int] = Field(default_factory=lambda: list(_RETRY_ON))
    idempotency_header: str = "Idempotency-Key"
    add_idempotency_key: bool = False
    max_replay_body: Size = 1024 * 1024
    per_try_timeout: Duration = 0.0
    budget_percent: float = Field(default=20.0, ge=0, le=100)
    budget_min_retries: int = Field(default=3, ge=0)
    budget_window: Duration = 10.0

    @field_validator("on")
    @classmethod
    def _on(cls, v: list[str | int]) -> list[str | int]:
        for item in v:
            if isinstance(item, int):
                if not 400 <= item <= 599:
                    raise ValueError(f"{item}: retry on 4xx or 5xx statuses only")
            elif item not in CONDITIONS:
                raise ValueError(f"{item!r}: expected a status code or one of {', '.join(CONDITIONS)}")
        return v

    @field_validator("idempotency_header")
    @classmethod
    def _header(cls, v: str) -> str:
        return check_header_name(v, forwardable=False)

    @field_validator("budget_window")
    @classmethod
    def _window(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("budget_window must be longer than 0")
        return v


class RetryBudget:
    """Retries allowed: ``min_retries + percent`` of the requests over a sliding window.

    Finagle's RetryBudget and Envoy's retry budget work this way: under a
    sustained failure retries add a bounded share of load instead of
    multiplying it by ``attempts``.
    """

    __slots__ = ("percent", "floor", "span", "buckets", "requests", "retries")

    def __init__(self, percent: float, min_retries: int, window: float) -> None:
        self.percent = percent
        self.floor = min_retries * 100
        self.span = window / 10
        self.buckets: deque[list[int]] = deque()  # [bucket index, requests, retries]
        self.requests = 0
        self.retries = 0

    def _bucket(self, now: float) -> list[int]:
        idx = int(now / self.span)
        b = self.buckets
        while b and b[0][0] <= idx - 10:
            _, req, ret = b.popleft()
            self.requests -= req
            self.retries -= ret
        if not b or b[-1][0] != idx:
            b.append([idx, 0, 0])
        return b[-1]

    def request(self, now: float) -> None:
        self._bucket(now)[1] += 1
        self.requests += 1

    def withdraw(self, now: float) -> bool:
        """Take one retry from the budget; False when it is spent."""
        bucket = self._bucket(now)
        if (self.retries + 1) * 100 > self.floor + self.percent * self.requests:
            return False
        bucket[2] += 1
        self.retries += 1
        return True


async def _chain(head: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    async for chunk in rest:
        yield chunk


def retries_counter(metrics: "Metrics") -> Counter:
    return metrics.counter("sidecar_retries", "Retries sent upstream, by route and the reason for the retry.",
                           ["route", "reason"])


class _Try:
    """The request as the first try sends it, for the tries after it."""

    __slots__ = ("method", "path", "query", "body", "headers", "deadline")

    def __init__(self, ex: Exchange) -> None:
        self.method, self.path, self.query, self.body = ex.method, ex.path, ex.query, ex.body
        # Not ex.headers: on the fast server the head stays bytes (proxy/rawexchange.py).
        self.headers = ex.save_headers()
        self.deadline = ex.deadline


class RetryFilter(Filter):
    def __init__(self, route: str, config: Config, counter: Counter) -> None:
        self.config = config
        self.route = route
        self.attempts = config.attempts
        self.base = config.backoff.base
        self.cap = config.backoff.max
        self.on_status = frozenset(x for x in config.on if isinstance(x, int))
        self.on_connect = "connect_error" in config.on
        self.on_timeout = "timeout" in config.on
        self.key_header = config.idempotency_header
        self.add_key = config.add_idempotency_key
        self.max_replay = config.max_replay_body
        self.per_try = config.per_try_timeout or None
        self.budget = RetryBudget(config.budget_percent, config.budget_min_retries, config.budget_window)
        self.counter = counter
        self._reasons: dict[str, Any] = {}
        self._streamed = Defer(self._run_streamed)

    def _count(self, reason: str) -> None:
        child = self._reasons.get(reason)
        if child is None:
            child = self._reasons[reason] = self.counter.labels(self.route, reason)
        child.inc()

    async def _replayable(self, ex: Exchange) -> bool:
        """Buffer the request body up to max_replay_body; False when it is larger.

        A larger body still goes upstream whole, once: the buffered head is
        chained in front of the rest of the stream.
        """
        body = ex.body
        if body is None or isinstance(body, bytes | bytearray):
            return True
        if ex.body_length is not None:
            if ex.body_length > self.max_replay:
                return False
            await ex.read_body(self.max_replay)
            return True
        it = body.__aiter__()
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                chunk = await it.__anext__()
            except StopAsyncIteration:
                ex.body = b"".join(parts)
                return True
            parts.append(chunk)
            size += len(chunk)
            if size > self.max_replay:
                ex.body = _chain(parts, it)
                return False

    def _delay(self, attempt: int, resp: ProxyResponse | None) -> float:
        if resp is not None:
            ra = retry_after(resp.headers.get("Retry-After"), time.time())
            if ra is not None:
                return min(ra, self.cap)
        # Full jitter (AWS architecture blog, "Exponential Backoff and Jitter").
        return random.uniform(0, min(self.cap, self.base * (2 ** (attempt - 1))))  # noqa: S311 -- jitter, not a secret

    # The common case is a sync layer (proxy/chain.py): before() notes the
    # request, after()/after_error() let a first try that needs no retry
    # through without a coroutine, and answer Again when it does; a streamed
    # body (to buffer for replay) takes the async path from the start.
    sync = True

    def before(self, ex: Exchange) -> Defer | None:
        self.budget.request(time.monotonic())
        retryable = ex.method in IDEMPOTENT or ex.has_header(self.key_header)
        if not retryable and self.add_key and ex.method == "POST":
            # Stripe-style providers deduplicate on the key, so a retry is safe.
            ex.set_header(self.key_header, str(uuid.uuid4()))
            retryable = True
        if not retryable or self.attempts == 1:
            ex.response_headers.append(("X-Sidecar-Attempts", "1"))
            return None
        body = ex.body
        if body is not None and not isinstance(body, bytes | bytearray):
            return self._streamed
        st = _Try(ex)
        ex.vars[NAME] = st
        ex.attempt = 1
        if self.per_try is not None:
            d = time.monotonic() + self.per_try
            ex.deadline = d if st.deadline is None else min(d, st.deadline)
        return None

    def after(self, ex: Exchange, resp: ProxyResponse) -> Again | None:
        st = ex.vars.pop(NAME, None)
        if st is None:
            return None
        ex.deadline = st.deadline
        if resp.status not in self.on_status:
            ex.response_headers.append(("X-Sidecar-Attempts", "1"))
            return None
        return Again(lambda x, outcome, call_next: self._loop(x, call_next, st, outcome))

    def after_error(self, ex: Exchange, exc: BaseException) -> Again | None:
        st = ex.vars.pop(NAME, None)
        if st is None:
            return None
        ex.deadline = st.deadline
        if (isinstance(exc, UpstreamTimeout) and self.on_timeout) or (
                isinstance(exc, UpstreamUnavailable) and self.on_connect):
            return Again(lambda x, outcome, call_next: self._loop(x, call_next, st, outcome))
        ex.response_headers.append(("X-Sidecar-Attempts", "1"))
        return None

    async def _run_streamed(self, ex: Exchange, call_next: Handler) -> ProxyResponse:
        if not await self._replayable(ex):
            ex.log[NAME] = "body_too_large_to_replay"
            ex.response_headers.append(("X-Sidecar-Attempts", "1"))
            return await call_next(ex)
        return await self._loop(ex, call_next, _Try(ex))

    async def _loop(self, ex: Exchange, call_next: Handler, st: "_Try", outcome: Any = None) -> ProxyResponse:
        """Tries until one is not retried. ``outcome``: the first try's
        response or exception when it already ran (the sync path)."""
        deadline = st.deadline
        per_try = self.per_try
        attempt = 1
        try:
            while True:
                ex.attempt = attempt
                resp: ProxyResponse | None = None
                error: UpstreamError | None = None
                if outcome is not None:
                    # Attempt 1 ran on the sync path; after/after_error let
                    # only a retryable outcome through to here.
                    if isinstance(outcome, ProxyResponse):
                        resp = outcome
                    else:
                        error = outcome
                        reason = "timeout" if isinstance(outcome, UpstreamTimeout) else "connect_error"
                    outcome = None
                else:
                    if attempt > 1:
                        # Inner filters (credentials) run again on a clean request.
                        ex.method, ex.path, ex.query, ex.body = st.method, st.path, st.query, st.body
                        ex.restore_headers(st.headers)
                    if per_try is not None:
                        d = time.monotonic() + per_try
                        ex.deadline = d if deadline is None else min(d, deadline)
                    try:
                        resp = await call_next(ex)
                    except UpstreamTimeout as e:
                        if not self.on_timeout:
                            raise
                        error, reason = e, "timeout"
                    except UpstreamUnavailable as e:
                        if not self.on_connect:
                            raise
                        error, reason = e, "connect_error"
                    finally:
                        ex.deadline = deadline
                if resp is not None:
                    if resp.status not in self.on_status:
                        return resp
                    reason = str(resp.status)
                gave_up = None
                delay = 0.0
                if attempt >= self.attempts:
                    gave_up = "attempts"
                else:
                    delay = self._delay(attempt, resp)
                    if deadline is not None and time.monotonic() + delay >= deadline:
                        gave_up = "deadline"
                    elif not self.budget.withdraw(time.monotonic()):
                        gave_up = "budget"
                if gave_up is not None:
                    ex.log[NAME] = {"attempts": attempt, "gave_up": gave_up, "last": reason}
                    if resp is not None:
                        return resp
                    assert error is not None
                    raise error
                if resp is not None:
                    resp.close()
                self._count(reason)
                if delay > 0:
                    await asyncio.sleep(delay)
                attempt += 1
        finally:
            ex.response_headers.append(("X-Sidecar-Attempts", str(attempt)))

    def describe(self) -> dict[str, Any]:
        return {"config": self.config.model_dump(),
                "budget": {"requests": self.budget.requests, "retries": self.budget.retries}}


def build(config: Config, ctx: BuildContext) -> Filter | None:
    return RetryFilter(ctx.route, config, retries_counter(ctx.runtime.metrics))


@hookimpl
def sidecar_plugins_register() -> list[PluginSpec]:
    return [PluginSpec(NAME, Config, PRIORITY, build,
                       description="retry idempotent requests on transient failures, within a budget")]
