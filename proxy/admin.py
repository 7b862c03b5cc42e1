"""The admin listener: /health, /ready, /metrics, /admin/routes, /admin/reload.

Bound to localhost by default. Plugins add their own endpoints through the
``sidecar_admin_routes`` hook.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from .errors import error_body

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
    ok, checks = await runtime_of(request).ready()
    return json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)


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
        })
    return json_response({"routes": out, "loaded_at": rt.loaded_at})


async def reload(request: web.Request) -> web.Response:
    problems = await runtime_of(request).reload()
    if problems:
        return json_response({"reloaded": False, "problems": problems}, status=422)
    return json_response({"reloaded": True})


@web.middleware
async def json_errors(request: web.Request, handler):  # type: ignore[no-untyped-def]
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


def make_admin_app(runtime: "Runtime") -> web.Application:
    app = web.Application(middlewares=[json_errors])
    app[RUNTIME] = runtime
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/routes", routes)
    app.router.add_post("/admin/reload", reload)
    runtime.pm.hook.sidecar_admin_routes(runtime=runtime, app=app)
    return app
