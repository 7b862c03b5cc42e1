"""cache: a shared HTTP response cache for outbound routes (RFC 9111, RFC 5861).

```toml
[cache]
ttl = "60s"                     # freshness for responses that give none (0: only what they allow)
max_body = "1MB"                # larger responses stream through unstored
stale_if_error = "5m"           # serve a stale entry when the upstream fails
stale_while_revalidate = "30s"  # serve stale while one background refresh runs
authorized = false              # true: store credentialed responses, keyed per tenant
```
Memory store (a per-route LRU bounded by max_entries / max_memory) by
default; Redis, shared by every sidecar, when ``[state] backend = "redis"``.
``X-Cache: HIT | MISS | STALE | BYPASS`` and ``Age`` on every answer;
GET /admin/cache and POST /admin/cache/<policy>/purge. See docs/cache.md.

PRIORITY 755: outside retry (750) and the circuit breaker (700), so a hit
skips both and stale-if-error answers an open circuit; inside fallback (a
stale entry beats a static fallback); outside auth, so a hit never reaches
the credential plugin and a miss is fetched with fresh credentials. Modules:
filter.py (lookup, serving, fetch and tee, invalidation), storable.py (what
is stored and for how long), coalesce.py (single-flight misses), refresh.py
(stale-while-revalidate refreshes), rules.py (RFC 9111 as pure functions),
store.py (memory LRU, Redis).
"""

from __future__ import annotations

from typing import Any

from proxy.errors import FieldError
from proxy.hookspecs import hookimpl
from proxy.plugins import INJECTS_CREDENTIALS, BuildContext, PluginSpec

from .config import Config
from .filter import NAME, CacheFilter, CacheMiss
from .store import MemoryStore, RedisStore

PRIORITY = 755

__all__ = ["Config", "CacheFilter", "CacheMiss", "PRIORITY", "build", "cache_filters"]

def _counter(runtime: Any) -> Any:
    return runtime.metrics.counter(
        "sidecar_cache_requests", "Cacheable requests by route and result "
        "(hit, miss, stale, bypass, revalidated).", ["route", "result"])


def build(config: Config, ctx: BuildContext) -> CacheFilter:
    rt = ctx.runtime
    kind = config.store
    if kind == "auto":
        kind = "redis" if rt.state.redis is not None else "memory"
    if kind == "redis":
        if rt.state.redis is None:
            raise FieldError("store", 'store = "redis" needs [state] backend = "redis" in config.toml')
        store: MemoryStore | RedisStore = RedisStore(rt.state, ctx.route)
    else:
        store = MemoryStore(config.max_entries, config.max_memory)
    # A plugin that injects credentials next to the upstream makes every
    # upstream request of the route an authorized one (RFC 9111 3.5).
    injects = ctx.route_has(INJECTS_CREDENTIALS)
    return CacheFilter(config, ctx.route, store, _counter(rt), injects,
                       ctx.policy.core.timeouts.total or 0.0)


def cache_filters(runtime: Any) -> dict[str, CacheFilter]:
    """The live cache filter of each route, by policy name."""
    return runtime.route_filters(NAME)


@hookimpl
def sidecar_plugins_register() -> list[PluginSpec]:
    return [PluginSpec(NAME, Config, PRIORITY, build,
                       description="HTTP response cache (RFC 9111, stale-if-error, stale-while-revalidate)")]


def tenant_stats(runtime: Any, tenant: str) -> dict[str, Any]:
    """One tenant's hits, misses and hit rate per route and overall; only the
    busiest 1,000 tenants of a route are counted (proxy/tenants.py)."""
    routes: dict[str, Any] = {}
    hits = misses = 0
    for name, f in sorted(cache_filters(runtime).items()):
        c = f.tenants.get(tenant)
        if c is None:
            continue
        h, m = c["hit"] + c["revalidated"] + c["stale"], c["miss"]
        hits, misses = hits + h, misses + m
        routes[name] = {"hits": h, "misses": m, "bypass": c["bypass"], "stale": c["stale"],
                        "hit_rate": round(h / (h + m), 4) if h + m else None}
    return {"tenant": tenant, "tracked": bool(routes), "hits": hits, "misses": misses,
            "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None, "routes": routes}


@hookimpl
def sidecar_admin_routes(runtime: Any, app: Any) -> None:
    from proxy.admin import json_error, json_response

    async def show(request: Any) -> Any:
        tenant = request.query.get("tenant")
        if tenant is not None:
            return json_response(tenant_stats(runtime, tenant))
        return json_response({"routes": {name: await f.stats()
                                         for name, f in sorted(cache_filters(runtime).items())}})

    async def purge(request: Any) -> Any:
        name = request.match_info["policy"]
        f = cache_filters(runtime).get(name)
        if f is None:
            return json_error(404, "no_cache", f"policy {name!r} has no [cache] table")
        return json_response({"policy": name, "purged": await f.purge()})

    app.router.add_get("/admin/cache", show)
    app.router.add_post("/admin/cache/{policy}/purge", purge)
