"""The rate-limit filter: pick the limits, decide, answer or pass (or wait)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from proxy.chain import Defer, Exchange, Filter, Handler, ProxyResponse
from proxy.errors import SidecarError

from .config import Config, Limit
from .gcra import Decision, LimitSpec

log = logging.getLogger("sidecar.rate_limit")

try:  # the Redis client is a core dependency; its errors mean "backend down"
    from redis.exceptions import RedisError
except ImportError:  # pragma: no cover
    RedisError = OSError  # type: ignore[misc,assignment]

BACKEND_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
RESULTS = ("allowed", "queued", "rejected", "shadow_rejected")


class RateLimited(SidecarError):
    status, code, message = 429, "rate_limited", "rate limit exceeded"


class RateLimitUnavailable(SidecarError):
    status, code, message = 503, "rate_limit_unavailable", "the rate-limit backend is unavailable"


@dataclass(eq=False)
class Group:
    """The limits that apply to a request (the route's, or one override's), compiled."""

    scope: str                          # "" for the route's own limits, else the override's match
    limits: tuple[LimitSpec, ...]
    prefixes: tuple[str, ...]           # namespaced state key per limit, before the key value
    policy_header: str                  # RateLimit-Policy (constant per group)
    counters: dict[str, list[Any]]      # result -> per-limit prebound counter children
    config: list[Limit]
    # One limit (the common case): the RateLimit item's constant start and
    # X-RateLimit-Limit, so the headers are two formats per request.
    item_prefix: str = ""
    limit_str: str = ""

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": lim.label, "requests": lim.requests, "per": lim.per,
                 "burst": lim.burst or lim.requests} for lim in self.config]


def compile_group(route: str, scope: str, limits: list[Limit], state_key: Callable[..., str],
                  decisions: Any, batch: Callable[[Any], Any] = lambda child: child) -> Group:
    specs = tuple(LimitSpec.make(lim.label, lim.requests, lim.per, lim.burst or lim.requests)
                  for lim in limits)
    # The state key names the limit's shape, so changing a limit starts fresh
    # buckets while an unrelated policy edit keeps them.
    prefixes = tuple(state_key("rl", route, scope or "-", f"{s.requests}r{s.per:g}s{s.burst}b") + ":"
                     for s in specs)
    # draft-ietf-httpapi-ratelimit-headers-10 section 3: a List of quota policy
    # Items: sf-string name; q (quota units), w (window, whole seconds).
    policy = ", ".join(f'"{s.name}";q={s.requests};w={max(1, math.ceil(s.per))}' for s in specs)
    counters = {r: [batch(decisions.labels(route, s.name, r)) for s in specs] for r in RESULTS}
    return Group(scope, specs, prefixes, policy, counters, limits,
                 f'"{specs[0].name}";r=', str(specs[0].requests))


def _short(value: str) -> str:
    # Bounded state keys, whatever a client puts in the header (non-UTF-8
    # bytes included: aiohttp keeps them as surrogates).
    if len(value) > 128:
        return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()
    return value


def credential_key(salt: bytes, value: str | None) -> str:
    """The key value for a credential: an HMAC of it, keyed per service.

    SECURITY (issue 11): with ``key = "header:Authorization"`` the raw value
    is the service's own token; it must not become a Redis key, nor be shown
    by /admin/rate_limits. A hash cannot protect a guessable credential from
    whoever reads Redis and knows the service name; it keeps the value itself
    out of every place a key is stored or shown.
    """
    if not value:
        return "-"
    return "hmac-sha256:" + hmac.new(salt, value.encode("utf-8", "surrogateescape"),
                                     hashlib.sha256).hexdigest()[:32]


def key_function(spec: str, secret_headers: frozenset[str] = frozenset(),
                 salt: bytes = b"") -> Callable[[Exchange], str] | None:
    """The request's key value; None when every request shares one bucket.

    A header in ``secret_headers`` (lower-case names: credentials and
    ``[logging] redact_headers``) gives ``credential_key`` values."""
    if spec.startswith("header:"):
        name = spec[len("header:"):]
        if name.lower() in secret_headers:
            return lambda ex: credential_key(salt, ex.headers.get(name))
        return lambda ex: _short(ex.headers.get(name) or "-")
    if spec == "tenant":
        return lambda ex: _short(ex.tenant or "-")
    if spec == "client_ip":
        return lambda ex: ex.client_ip or "-"
    return None


class RateLimitFilter(Filter):
    def __init__(self, route: str, config: Config, default: Group | None,
                 overrides: list[tuple[str | None, str, bool, Group]], store: Any,
                 backend_errors: Any, pacer: Any = None, secret_headers: frozenset[str] = frozenset(),
                 salt: bytes = b"") -> None:
        self.route = route
        self.config = config
        self.default = default
        self.overrides = overrides
        self.store = store
        # A Store (stores.py) says whether it decides without a coroutine
        # (memory, the shared table) or awaits (Redis).
        self.store_sync = store.sync
        # [rate_limit.upstream]: runs between the local limits and the upstream,
        # around the call, so a paced route keeps handle().
        self.pacer = pacer
        # A sync layer (proxy/chain.py): an in-process store and no pacing.
        self.sync = self.store_sync and pacer is None
        self.key_of = key_function(config.key, secret_headers, salt)
        key = config.key
        self._secret_key = key.startswith("header:") and key[len("header:"):].lower() in secret_headers
        self._salt = salt
        self.enforce = config.enforce
        # Shadow mode never makes a request wait.
        self.max_wait = config.max_wait if config.enforce else 0.0
        self.fail_open = config.fail_open
        self.backend_errors = backend_errors
        self._last_warning = -math.inf  # not 0.0: time.monotonic() counts from boot
        # The memory store decides a single limit without lists (_handle_one).
        self.decide_one = getattr(store, "decide_one", None) if self.store_sync else None

    def group_for(self, method: str, path: str) -> Group | None:
        if "%" in path:
            # Overrides match the decoded path, as routes do (proxy/admission.py)
            # and as the service routes it: else "/api%2Flogin" dodges a
            # "/api/login" limit.
            path = unquote(path)
        for m, p, prefix, group in self.overrides:
            if (m is None or m == method) and (path.startswith(p) if prefix else path == p):
                return group
        return self.default

    def key_value(self, raw: str) -> str:
        """The key value a request carrying ``raw`` has (admin lookups)."""
        if self._secret_key:
            return credential_key(self._salt, raw)
        if self.config.key == "client_ip":
            return raw
        return _short(raw or "-")

    def keys_for(self, group: Group, value: str | None) -> list[str]:
        if value is None:
            return list(group.prefixes)
        return [p + value for p in group.prefixes]

    def _max_wait(self, ex: Exchange) -> float:
        max_wait = self.max_wait
        if max_wait and ex.deadline is not None:
            # No point queueing past the route's own deadline.
            max_wait = min(max_wait, max(ex.deadline - time.monotonic(), 0.0))
        return max_wait

    def before(self, ex: Exchange) -> Defer | None:
        """The in-process stores (memory, and the shared table of several
        workers) decide without awaiting: a sync layer (proxy/chain.py); only
        a queued request takes the asynchronous path, to wait."""
        group = self.group_for(ex.method, ex.path) if self.overrides else self.default
        if group is None:
            return None
        try:
            if self.decide_one is not None and len(group.limits) == 1:
                wait = self._one(ex, group)
            else:
                keys = self.keys_for(group, None if self.key_of is None else self.key_of(ex))
                wait = self._decided(ex, group, self.store.decide(keys, group.limits, self._max_wait(ex)))
        except BACKEND_ERRORS as e:
            self._backend_down(ex, e)
            return None
        if wait:
            return Defer(_after_sleep(wait))
        return None

    async def handle(self, ex: Exchange, call_next: Handler) -> ProxyResponse:
        if self.pacer is not None:
            pacer, upstream = self.pacer, call_next
            call_next = lambda e: pacer.handle(e, upstream)  # noqa: E731
        if self.store_sync:
            d = self.before(ex)
            if d is not None:
                return await d.run(ex, call_next)
            return await call_next(ex)
        group = self.group_for(ex.method, ex.path) if self.overrides else self.default
        if group is None:
            return await call_next(ex)
        keys = self.keys_for(group, None if self.key_of is None else self.key_of(ex))
        try:
            d = await self.store.decide(keys, group.limits, self._max_wait(ex))
        except BACKEND_ERRORS as e:
            self._backend_down(ex, e)
            return await call_next(ex)
        wait = self._decided(ex, group, d)
        if wait:
            await asyncio.sleep(wait)
        return await call_next(ex)

    def _decided(self, ex: Exchange, group: Group, d: Decision) -> float:
        """Headers, counters and log for a decision; the seconds to wait
        before going on (0: now). Raises RateLimited when refused."""
        if d.admitted:
            bound = _tightest(d)
            _headers(ex.response_headers, group, d, bound)
            if d.wait > 0:
                for c in group.counters["queued"]:
                    c.inc()
                ex.log["rate_limit"] = {"result": "queued", "wait_ms": round(d.wait * 1000, 1)}
                return d.wait
            for c in group.counters["allowed"]:
                c.inc()
            ex.log["rate_limit"] = {"result": "allowed"}
            return 0.0
        i = d.refused_by
        name = group.limits[i].name
        _headers(ex.response_headers, group, d, i)
        if not self.enforce:
            group.counters["shadow_rejected"][i].inc()
            ex.log["rate_limit"] = {"result": "shadow_rejected", "limit": name}
            return 0.0
        group.counters["rejected"][i].inc()
        ex.log["rate_limit"] = {"result": "rejected", "limit": name}
        raise RateLimited(f"rate limit {name!r} exceeded", headers={"Retry-After": str(max(1, math.ceil(d.wait)))})

    def _one(self, ex: Exchange, group: Group) -> float:
        """``_decided`` for one limit on the memory store: the same decision,
        headers, counters and log, without the per-request lists."""
        key = group.prefixes[0] if self.key_of is None else group.prefixes[0] + self.key_of(ex)
        max_wait = self.max_wait
        if max_wait and ex.deadline is not None:
            max_wait = self._max_wait(ex)
        admitted, wait, rem, reset = self.decide_one(key, group.limits[0], max_wait)  # type: ignore[misc]
        reset_s = str(math.ceil(reset - 1e-6)) if reset > 0 else "0"
        if not admitted:
            rem = 0
        rem_s = str(rem)
        ex.response_headers.extend((
            ("RateLimit-Policy", group.policy_header),
            ("RateLimit", f"{group.item_prefix}{rem_s};t={reset_s}"),
            ("X-RateLimit-Limit", group.limit_str),
            ("X-RateLimit-Remaining", rem_s),
            ("X-RateLimit-Reset", reset_s)))
        if admitted:
            if wait > 0:
                group.counters["queued"][0].inc()
                ex.log["rate_limit"] = {"result": "queued", "wait_ms": round(wait * 1000, 1)}
                return wait
            group.counters["allowed"][0].inc()
            ex.log["rate_limit"] = {"result": "allowed"}
            return 0.0
        name = group.limits[0].name
        if not self.enforce:
            group.counters["shadow_rejected"][0].inc()
            ex.log["rate_limit"] = {"result": "shadow_rejected", "limit": name}
            return 0.0
        group.counters["rejected"][0].inc()
        ex.log["rate_limit"] = {"result": "rejected", "limit": name}
        raise RateLimited(f"rate limit {name!r} exceeded", headers={"Retry-After": str(max(1, math.ceil(wait)))})

    def _backend_down(self, ex: Exchange, err: BaseException) -> None:
        """Fail open (return: the request goes on) or raise RateLimitUnavailable."""
        self.backend_errors.inc()
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            log.warning("route %s: rate-limit backend unavailable (%s); %s", self.route,
                        type(err).__name__, "letting traffic through" if self.fail_open else "answering 503")
        if self.fail_open:
            ex.log["rate_limit"] = {"result": "backend_error", "fail_open": True}
            return
        ex.log["rate_limit"] = {"result": "backend_error", "fail_open": False}
        raise RateLimitUnavailable()

    def describe(self) -> dict[str, Any]:
        return self.config.model_dump()


def _after_sleep(wait: float) -> Callable[[Exchange, Handler], Any]:
    """A queued request's asynchronous path: wait its reserved turn, go on."""
    async def run(ex: Exchange, call_next: Handler) -> ProxyResponse:
        await asyncio.sleep(wait)
        return await call_next(ex)

    return run


def _tightest(d: Decision) -> int:
    """The limit the X-RateLimit-* headers describe: least remaining, then longest reset."""
    best = 0
    for i in range(1, len(d.remaining)):
        if (d.remaining[i], -d.reset[i]) < (d.remaining[best], -d.reset[best]):
            best = i
    return best


def _headers(out: list[tuple[str, str]], group: Group, d: Decision, bound: int) -> None:
    limits = group.limits
    rem = d.remaining
    reset = [math.ceil(r - 1e-6) if r > 0 else 0 for r in d.reset]
    if not d.admitted:
        rem = list(rem)
        rem[bound] = 0
    # draft-ietf-httpapi-ratelimit-headers-10 section 4: quota items with r
    # (remaining units) and t (seconds until the quota resets).
    out.append(("RateLimit-Policy", group.policy_header))
    out.append(("RateLimit", ", ".join(f'"{lim.name}";r={rem[i]};t={reset[i]}'
                                        for i, lim in enumerate(limits))))
    out.append(("X-RateLimit-Limit", str(limits[bound].requests)))
    out.append(("X-RateLimit-Remaining", str(rem[bound])))
    out.append(("X-RateLimit-Reset", str(reset[bound])))
