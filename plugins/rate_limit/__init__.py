"""rate_limit: GCRA limits per key, exact in memory (one process or several
workers) and across sidecars sharing a Redis; standard headers; queue mode.

```toml
[rate_limit]
key = "header:X-Tenant-ID"      # or "tenant", "client_ip", "route", "const"
limits = [{ requests = 3, per = "1s", burst = 5 }, { requests = 10000, per = "1d" }]
on_limit = "reject"             # or "queue" with max_wait = "10s"

[[rate_limit.overrides]]
match = "POST /v1/embeddings*"
limits = [{ requests = 100, per = "1m" }]
```
See docs/rate_limit.md for the algorithm, the stores and the headers.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy.admin import json_error, json_response, runtime_of
from proxy.hookspecs import hookimpl
from proxy.plugins import BuildContext, PluginSpec

from .config import Config, Limit, Override
from .filter import BACKEND_ERRORS, Group, RateLimitFilter, compile_group, key_function
from .gcra import MemoryStore, SharedStore
from .upstream import RedisBlocks, UpstreamPacer, UpstreamQuota
from .stores import Store

if TYPE_CHECKING:
    from proxy.runtime import Runtime

NAME = "rate_limit"
PRIORITY = 800  # inside authentication (jwt, forward_auth), outside retry: retries do not consume quota

#: Where the supervisor of ``workers > 1`` puts files its workers share.
RUN_DIR_ENV = "SIDECAR_RUN_DIR"

__all__ = ["Config", "Limit", "Override", "PRIORITY", "build", "RateLimitFilter", "UpstreamQuota"]


class _PerRuntime:
    """The store and metrics one runtime's rate-limit filters share."""

    def __init__(self, runtime: "Runtime") -> None:
        m = runtime.metrics
        self.decisions = m.counter("sidecar_rate_limit_decisions",
                                   "Rate-limit decisions, by route, limit and result.",
                                   ["route", "limit", "result"])
        self.backend_errors = m.counter("sidecar_rate_limit_backend_errors",
                                        "Decisions the rate-limit backend could not make, by route.",
                                        ["route"])
        self.upstream_decisions = m.counter(
            "sidecar_rate_limit_upstream_decisions",
            "Pacing to the provider's quota, by route and result (learned, queued, rejected, shadow_rejected).",
            ["route", "result"])
        # Keys credential-header values are hashed with (filter.credential_key).
        self.salt = hashlib.sha256(b"sidecar rate_limit key\x00"
                                   + runtime.settings.sidecar.service.encode()).digest()
        state = runtime.state
        # [rate_limit.upstream] blocks: in Redis when the state is shared.
        self.blocks = RedisBlocks(state.redis) if state.redis is not None else None
        run_dir = os.environ.get(RUN_DIR_ENV)
        self.store: Store
        if state.redis is not None:
            from .redis_store import RedisStore

            self.store = RedisStore(state)
            self.backend = state.kind
        elif run_dir:
            # workers > 1: one table for the whole sidecar (docs/rate_limit.md).
            self.store = SharedStore(os.path.join(run_dir, "rate_limit.table"))
            self.backend = "memory-shared"
        else:
            self.store = MemoryStore()
            self.backend = "memory"
        runtime.on_shutdown(self.store.close)


def _per_runtime(runtime: "Runtime") -> _PerRuntime:
    return runtime.service(NAME, lambda: _PerRuntime(runtime))


def build(config: Config, ctx: BuildContext) -> RateLimitFilter:
    rt = ctx.runtime
    shared = _per_runtime(rt)
    key = rt.state.key
    batch = rt.metrics.batched
    default = compile_group(ctx.route, "", config.limits, key, shared.decisions, batch) if config.limits else None
    overrides = []
    for o in config.overrides:
        method, path, prefix = o.parsed()
        overrides.append((method, path, prefix, compile_group(ctx.route, o.match, o.limits, key, shared.decisions,
                                                               batch)))
    errors = shared.backend_errors.labels(ctx.route)
    pacer = None
    if config.upstream is not None:
        pacer = UpstreamPacer(
            ctx.route, config.upstream, key_function(config.key, frozenset(rt.redactor.headers), shared.salt), config.on_limit == "queue", config.max_wait,
            config.enforce, key("rl-upstream", ctx.route) + ":", shared.blocks,
            {r: batch(shared.upstream_decisions.labels(ctx.route, r))
             for r in ("learned", "queued", "rejected", "shadow_rejected")}, errors, BACKEND_ERRORS,
            key("rl-upstream-index", ctx.route))
    return RateLimitFilter(ctx.route, config, default, overrides, shared.store, errors, pacer,
                           secret_headers=frozenset(rt.redactor.headers), salt=shared.salt)


def _filters(runtime: "Runtime") -> dict[str, RateLimitFilter]:
    return runtime.route_filters(NAME)  # type: ignore[return-value]


async def _remaining(f: RateLimitFilter, group: Group, key: str) -> list[dict[str, Any]]:
    keys = f.keys_for(group, None if f.key_of is None else key)
    store = f.store
    if store.sync is True:
        quota = store.peek(keys, group.limits)
    else:
        quota = await store.peek(keys, group.limits)
    return [{**d, "remaining": left, "reset": round(reset, 3)}
            for d, (left, reset) in zip(group.describe(), quota)]


async def admin_rate_limits(request: web.Request) -> web.Response:
    """GET /admin/rate_limits[?route=<name>[&key=<value>]]: limits, and a key's remaining quota."""
    rt = runtime_of(request)
    filters = _filters(rt)
    shared = rt.services.get(NAME)
    route = request.query.get("route")
    if route is None:
        return json_response({"backend": shared.backend if shared else None, "routes": [
            {"route": name, **_describe(f), **await _upstream(f)} for name, f in sorted(filters.items())]})
    f = filters.get(route)
    if f is None:
        return json_error(404, "no_such_route", f"no route named {route!r} has a rate limit")
    out: dict[str, Any] = {"route": route, **_describe(f), **await _upstream(f)}
    raw = request.query.get("key")
    if raw is not None:
        # The raw value is looked up but never echoed: it may be a credential.
        key = f.key_value(raw)
        out["key_value"] = key
        try:
            if f.default is not None:
                out["limits"] = await _remaining(f, f.default, key)
            out["overrides"] = [{"match": g.scope, "limits": await _remaining(f, g, key)}
                                for *_, g in f.overrides]
        except BACKEND_ERRORS:
            return json_error(503, "rate_limit_unavailable", "the rate-limit backend is unavailable")
    return json_response(out)


async def _upstream(f: RateLimitFilter) -> dict[str, Any]:
    """The provider quota this route paces to, and what it learned (``upstream``)."""
    return {} if f.pacer is None else {"upstream": await f.pacer.describe()}


def _describe(f: RateLimitFilter) -> dict[str, Any]:
    c = f.config
    return {"key": c.key, "on_limit": c.on_limit, "max_wait": c.max_wait, "enforce": c.enforce,
            "fail_open": c.fail_open,
            "limits": f.default.describe() if f.default is not None else [],
            "overrides": [{"match": g.scope, "limits": g.describe()} for *_, g in f.overrides]}


@hookimpl
def sidecar_plugins_register() -> list[PluginSpec]:
    return [PluginSpec(NAME, Config, PRIORITY, build, scope="both",
                       description="GCRA rate limits per key: memory or Redis, standard headers, queue mode")]


@hookimpl
def sidecar_admin_routes(runtime: "Runtime", app: web.Application) -> None:
    app.router.add_get("/admin/rate_limits", admin_rate_limits)
