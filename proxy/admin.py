"""The admin listener: /health, /health/detailed, /ready, /metrics, /admin/*, and
the dashboard page at /.

Bound to localhost by default. With ``[admin] token`` every /admin/* endpoint
needs ``Authorization: Bearer <token>``; the probes, /metrics and the static
dashboard page stay open (the page holds no data; it asks for the token).
Plugins add their own endpoints through the ``sidecar_admin_routes`` hook.
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from . import health as probes
from .config import config_digest
from .dashboard import add_dashboard
from .errors import error_body
from .secrets import SecretUnavailable
from .stats import route_stats

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("sidecar.admin")

RUNTIME = web.AppKey("runtime", object)


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data, option=orjson.OPT_INDENT_2), status=status,
                        content_type="application/json")


def json_error(status: int, code: str, message: str) -> web.Response:
    return web.Response(body=error_body(code, message, None), status=status,
                        content_type="application/json", headers={"X-Sidecar-Error": code})


def runtime_of(request: web.Request) -> "Runtime":
    return request.app[RUNTIME]  # type: ignore[return-value]


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    body = await probes.readiness(runtime_of(request))
    return json_response(body, status=200 if body["ready"] else 503)


async def health_detailed(request: web.Request) -> web.Response:
    body = await probes.detailed(runtime_of(request))
    return json_response(body, status=503 if body["status"] == "down" else 200)


async def config(request: web.Request) -> web.Response:
    """The live policy set: its version (a hash of every policy's content),
    when it went live, and the last reload's outcome."""
    rt = runtime_of(request)
    version = config_digest(sorted((p.name, p.digest) for p in rt.policies))
    return json_response({
        "version": version[:16], "loaded_at": rt.loaded_at,
        "policies": [{"name": p.name, "file": str(p.file), "route": p.core.route, "enabled": p.core.enabled,
                      "digest": p.digest[:16]} for p in sorted(rt.policies, key=lambda p: p.name)],
        "last_reload": rt.last_reload, "config_file": str(rt.settings.path) if rt.settings.path else None,
    })


async def stats(request: web.Request) -> web.Response:
    return json_response(route_stats(runtime_of(request)))


async def metrics(request: web.Request) -> web.Response:
    body = runtime_of(request).metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def routes(request: web.Request) -> web.Response:
    rt = runtime_of(request)
    out = []
    for r in sorted(rt.table.routes, key=lambda r: r.prefix):
        out.append({
            "name": r.name, "route": r.prefix, "upstream": r.upstream.url if r.upstream is not None else None,
            "file": str(r.policy.file),
            "chain": [{"plugin": f.name, "priority": rt.specs[f.name].priority, **f.describe()}
                      for f in r.filters],
            "limits": {"max_request_body": r.max_body, "max_header_size": r.max_header_size,
                       "max_headers": r.max_headers},
            "timeouts": r.policy.core.timeouts.model_dump(),
            "enabled": r.policy.core.enabled,
        })
    return json_response({"routes": out, "loaded_at": rt.loaded_at})


async def reload(request: web.Request) -> web.Response:
    problems = await runtime_of(request).reload()
    if problems:
        return json_response({"reloaded": False, "problems": problems}, status=422)
    return json_response({"reloaded": True})


@web.middleware
async def json_errors(request: web.Request, handler):
    """Admin errors are JSON too, and never a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return json_error(e.status, e.reason.lower().replace(" ", "_"), e.reason)
    except Exception:
        log.exception("admin request %s failed", request.path)
        return json_error(500, "internal_error", "internal error")


_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})


@web.middleware
async def same_origin_actions(request: web.Request, handler):
    """An admin action (POST) from a browser page of another origin is refused
    (CSRF: a form on any site the operator visits can POST to 127.0.0.1:9901,
    and without [admin] token position is the only guard). A request with no
    Origin (curl, probes, scripts) and the dashboard's own calls pass; this is
    the Origin check of OWASP's CSRF guidance, as Grafana does it."""
    if request.method not in _SAFE:
        origin = request.headers.get("Origin")
        site = request.headers.get("Sec-Fetch-Site")
        # Host only, not the scheme: behind a TLS-terminating ingress the page
        # is https:// while this listener sees http.
        if (origin is not None and origin.partition("://")[2] != request.host) or site in ("cross-site", "same-site"):
            return json_error(403, "cross_origin_refused",
                              "admin actions are not accepted from another origin's page")
    return await handler(request)


def admin_token(runtime: "Runtime") -> Any:
    """Middleware: ``Authorization: Bearer <token>`` on every /admin/* path."""
    ref = runtime.admin_token

    @web.middleware
    async def check(request: web.Request, handler):
        if ref is None or not request.path.startswith("/admin/"):
            return await handler(request)
        try:
            token = ref.get()
        except SecretUnavailable:
            # Fail closed: an unresolvable token never means "no token".
            return json_error(503, "admin_token_unavailable", f"the admin token {ref.raw} does not resolve")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            resp = json_error(401, "unauthorized", "admin endpoints need Authorization: Bearer <admin token>")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="sidecar-admin"'
            return resp
        return await handler(request)

    return check


def make_admin_app(runtime: "Runtime") -> web.Application:
    app = web.Application(middlewares=[json_errors, same_origin_actions, admin_token(runtime)])
    app[RUNTIME] = runtime
    app.router.add_get("/health", health)
    app.router.add_get("/health/detailed", health_detailed)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/routes", routes)
    app.router.add_post("/admin/reload", reload)
    app.router.add_get("/admin/config", config)
    app.router.add_get("/admin/stats", stats)
    add_dashboard(app)
    runtime.pm.hook.sidecar_admin_routes(runtime=runtime, app=app)
    return app
