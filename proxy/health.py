"""/health/detailed and /ready: each dependency as ``{"status", "latency_ms", "error"}``.

Statuses rank ok < degraded < down; the overall status is the worst part.
An unreachable state backend is down (rate limits, breakers and the webhook
de-duplication depend on it); a failing upstream, an open breaker, Vault
serving cached secrets or a rejected reload degrade the sidecar without
making it useless (Envoy's admin reports clusters the same way: per host,
without failing the process health check).

Plugins add parts with the ``sidecar_health_checks`` hook.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from yarl import URL

from .logs import mask_url

if TYPE_CHECKING:
    from .runtime import Runtime

RANK = {"ok": 0, "degraded": 1, "down": 2}

Check = Callable[[], Awaitable[dict[str, Any]]]


def part(status: str, latency_ms: float | None = None, error: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"status": status, "latency_ms": latency_ms, "error": error, **extra}


def worst(parts: list[dict[str, Any]]) -> str:
    return max((p["status"] for p in parts), key=RANK.__getitem__, default="ok")


async def state_backend(rt: "Runtime", timeout: float = 1.0) -> dict[str, Any]:
    state = rt.settings.state
    t0 = time.monotonic()
    if rt.state.kind != "redis":
        return part("ok", 0.0, None, backend="memory")
    url = mask_url(state.url)
    try:
        ok = bool(await asyncio.wait_for(rt.state.redis.ping(), timeout))  # type: ignore[union-attr]
        error = None if ok else "no PONG"
    except asyncio.TimeoutError:
        ok, error = False, f"no answer in {timeout:g}s"
    except Exception as e:  # redis-py's error classes vary by version
        ok, error = False, f"{type(e).__name__}: {e}"
    latency = round((time.monotonic() - t0) * 1000, 3)
    if error is not None:
        error = _scrub(error, state.url)
    return part("ok" if ok else "down", latency, None if ok else f"redis at {url}: {error}",
                backend="redis", url=url)


def _scrub(text: str, url: str) -> str:
    try:
        pw = URL(url).password
    except ValueError:
        return text
    return text.replace(pw, "***") if pw else text


def policies(rt: "Runtime") -> dict[str, Any]:
    if rt.loaded_at is None:
        return part("down", None, "no policy set loaded")
    last = rt.last_reload
    if last is not None and not last["ok"]:
        return part("degraded", None, f"last reload rejected ({len(last['problems'])} problem(s)); "
                    "the previous set keeps serving", routes=len(rt.table.routes))
    return part("ok", None, None, routes=len(rt.table.routes))


def upstreams(rt: "Runtime") -> dict[str, dict[str, Any]]:
    """Each route's upstream: its pool (fast client) and its breaker, when it has one."""
    pools = rt.pools.stats()
    out: dict[str, dict[str, Any]] = {}
    for r in rt.table.routes:
        if r.upstream is None:
            continue
        pool = pools.get(str(URL(r.upstream.url).origin()))
        breaker = None
        for f in r.filters:
            b = getattr(f, "breaker", None)
            if b is not None and hasattr(b, "snapshot"):
                breaker = b.snapshot().get("state")
        status = "ok"
        error = None
        if not r.policy.core.enabled:
            error = "route disabled (enabled = false)"
        elif breaker in ("open", "half-open", "half_open"):
            status, error = "degraded", f"circuit breaker {breaker}"
        out[r.name] = part(status, None, error, url=r.upstream.url, pool=pool, breaker=breaker)
    return out


async def detailed(rt: "Runtime") -> dict[str, Any]:
    checks: dict[str, Any] = {"state_backend": await state_backend(rt), "policies": policies(rt)}
    for found in rt.pm.hook.sidecar_health_checks(runtime=rt):
        for name, check in (found or {}).items():
            t0 = time.monotonic()
            try:
                res = await check()
            except Exception as e:
                res = part("degraded", None, f"{type(e).__name__}: {e}")
            res.setdefault("latency_ms", round((time.monotonic() - t0) * 1000, 3))
            res.setdefault("error", None)
            checks[name] = res
    ups = upstreams(rt)
    parts = list(checks.values()) + list(ups.values())
    return {"status": worst(parts), "checks": checks, "upstreams": ups}


async def readiness(rt: "Runtime") -> dict[str, Any]:
    """Ready = a policy set is live and the state backend answers."""
    checks = {"state_backend": await state_backend(rt), "policies": policies(rt)}
    if checks["policies"]["status"] == "degraded":
        checks["policies"]["status"] = "ok"   # a rejected reload leaves a serving set
    status = worst(list(checks.values()))
    return {"ready": status != "down", "status": status, "checks": checks}
