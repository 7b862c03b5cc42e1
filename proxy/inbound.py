"""The inbound listener: provider -> sidecar -> the local service.

Two kinds of paths live on it:

- webhook endpoints (exact paths, from policies' ``[webhook]`` tables), added
  by the webhook plugin through ``inbound_of(runtime).endpoints``;
- inbound routes (``[inbound.routes."/api"]`` in config.toml): path prefixes
  passed to ``service_url`` with the same path, through a chain of the plugins
  nested in the route's table (``jwt``, ``forward_auth``...).

```toml
[inbound]
listen = "127.0.0.1:8443"
service_url = "http://127.0.0.1:8000"
data_dir = "data"                  # relative to config.toml

[inbound.routes."/api".jwt]
secret = "env:JWT_SECRET"
```

The listener starts when config.toml has an ``[inbound]`` table or a policy
has a ``[webhook]`` table, and drains with the worker (``serve_runner``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.web_request import BaseRequest
from pydantic import Field, ValidationError, ValidationInfo, field_validator

from .chain import Filter
from .config import Listener, Policy, PolicyCore, Timeouts, TLS
from .errors import ConfigError
from .hookspecs import hookimpl
from .outbound import OutboundHandler
from .units import Duration
from .routes import Route, RouteTable

if TYPE_CHECKING:
    from .chain import Exchange
    from .runtime import Runtime

log = logging.getLogger("sidecar.inbound")

TABLE = "inbound"

#: An exact-path handler on the inbound listener (a webhook endpoint).
Endpoint = Callable[[BaseRequest], Awaitable[web.StreamResponse]]


class InboundSettings(Listener):
    """config.toml ``[inbound]``."""

    listen: str = "127.0.0.1:8443"
    service_url: str = "http://127.0.0.1:8000"
    # The embedded durable queue (SQLite) lives here; relative to config.toml.
    data_dir: str = "data"
    # Delivered webhooks are kept this long for /admin/webhooks/events, then pruned.
    retention: Duration = 7 * 86400.0
    # prefix -> {plugin name: validated plugin Config}
    routes: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("service_url")
    @classmethod
    def _service_url(cls, v: str) -> str:
        from yarl import URL

        url = URL(v)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("service_url must be an http:// or https:// URL with a host")
        if url.query_string or url.fragment:
            raise ValueError("service_url must not carry a query or fragment")
        return v.rstrip("/")

    @field_validator("routes")
    @classmethod
    def _routes(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        specs = (info.context or {}).get("plugin_specs")
        out: dict[str, dict[str, Any]] = {}
        for prefix, table in v.items():
            if not prefix.startswith("/") or any(c in prefix for c in "?#* \t"):
                raise ValueError(f"{prefix!r}: a route is a plain path prefix starting with '/'")
            route = prefix.rstrip("/") or "/"
            if not isinstance(table, dict):
                raise ValueError(f"{prefix}: expected a table of plugin tables")
            plugins: dict[str, Any] = {}
            for name, conf in table.items():
                if specs is None:  # validated without a plugin manager: keep raw
                    plugins[name] = conf
                    continue
                spec = specs.get(name)
                if spec is None or spec.scope == "outbound":
                    known = sorted(n for n, s in specs.items() if s.scope != "outbound")
                    raise ValueError(f"{prefix}: {name}: no inbound plugin of that name (known: {', '.join(known)})")
                if not isinstance(conf, dict):
                    raise ValueError(f"{prefix}: {name}: expected a table")
                try:
                    plugins[name] = spec.config(**conf)
                except ValidationError as e:
                    first = e.errors(include_url=False)[0]
                    field = ".".join(str(p) for p in first["loc"]) or "(table)"
                    msg = first["msg"].removeprefix("Value error, ")
                    if first["type"] == "extra_forbidden":
                        msg = "unknown key"
                    raise ValueError(f"{prefix}: {name}.{field}: {msg}") from None
            out[route] = plugins
        return out


class InboundHandler(OutboundHandler):
    """The inbound listener's handler: exact webhook paths first, then inbound routes."""

    def __init__(self, runtime: "Runtime") -> None:
        super().__init__(runtime)
        self.endpoints: dict[str, Endpoint] = {}
        self.table = RouteTable([])

    def match(self, path: str) -> "tuple[Route, str] | None":
        return self.table.match(path)

    async def __call__(self, request: BaseRequest) -> web.StreamResponse:
        ep = self.endpoints.get(request.raw_path.partition("?")[0])
        if ep is not None:
            return await ep(request)
        return await super().__call__(request)

    def _admit(self, request: BaseRequest, head, rid: str, started: float) -> "tuple[Route, Exchange, bool]":
        route, ex, continue_ = super()._admit(request, head, rid, started)
        # Inbound routes keep the whole path: /api/orders goes to service_url/api/orders.
        ex.path = request.raw_path.partition("?")[0]
        return route, ex, continue_


class Inbound:
    """One runtime's inbound side: settings, handler and compiled inbound routes."""

    def __init__(self, runtime: "Runtime") -> None:
        self.rt = runtime
        settings = runtime.extra_settings.get(TABLE)
        self.settings: InboundSettings = settings if isinstance(settings, InboundSettings) else InboundSettings()
        self.configured = TABLE in runtime.settings.extra_tables
        self.handler = InboundHandler(runtime)
        self.filters: list[Filter] = []
        self.port: int | None = None

    @property
    def endpoints(self) -> dict[str, Endpoint]:
        return self.handler.endpoints

    @property
    def data_dir(self) -> Path:
        return (self.rt.settings.base_dir / self.settings.data_dir).resolve()

    def compile_routes(self) -> None:
        rt = self.rt
        s = self.settings
        core = PolicyCore(limits=rt.settings.limits)
        routes: list[Route] = []
        problems: list[str] = []
        filters_now: dict[tuple[str, str, str], Filter] = {}
        where = str(rt.settings.path or "config")
        upstream = rt.pools.get(s.service_url, TLS(), Timeouts()) if s.routes else None
        for prefix, plugins in s.routes.items():
            name = f"inbound:{prefix}"
            raw = {k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for k, v in plugins.items()}
            policy = Policy(name, Path(where), core, plugins, raw)
            routes.append(rt.build_route(policy, plugins, prefix=prefix, scope="inbound", upstream=upstream,
                                         terminal=None, where=where, filters_now=filters_now,
                                         problems=problems, field_prefix=f"inbound.routes.{prefix}."))
        if problems:
            raise ConfigError(problems)
        self.filters = list(filters_now.values())
        self.handler.table = RouteTable(routes)

    async def close(self) -> None:
        for f in self.filters:
            try:
                await f.close()
            except Exception:
                log.exception("closing inbound filter %s failed", f.name)
        self.filters.clear()


def inbound_of(runtime: "Runtime") -> Inbound:
    """The runtime's Inbound (created on first use)."""
    return runtime.service(TABLE, lambda: Inbound(runtime))


@hookimpl
def sidecar_settings_register() -> dict[str, type[Any]]:
    return {TABLE: InboundSettings}


@hookimpl
def sidecar_runtime_startup(runtime: "Runtime") -> None:
    inbound = inbound_of(runtime)
    inbound.compile_routes()
    runtime.on_shutdown(inbound.close)


@hookimpl
async def sidecar_listeners_start(runtime: "Runtime", sidecar: Any) -> None:
    from .server import aiohttp_server

    inbound = inbound_of(runtime)
    if not (inbound.configured or inbound.endpoints or inbound.handler.table.routes):
        return
    s = inbound.settings
    runner = aiohttp_server(inbound.handler, runtime, s)
    inbound.port = await sidecar.serve_runner("inbound", runner, s.host, s.port)
    log.info("inbound listener on %s:%d (%d webhook paths, %d routes)", s.host, inbound.port,
             len(inbound.endpoints), len(inbound.handler.table.routes))
