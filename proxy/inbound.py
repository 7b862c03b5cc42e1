"""The inbound listener: provider or browser -> sidecar -> the local service.

Its route table holds two kinds of routes, built by ``Runtime.build_route``
like outbound ones and looked up by the same handler class:

- inbound routes (``[inbound.routes."/api"]`` in config.toml): path prefixes
  passed to ``service_url`` with the same path, through a chain of the plugins
  nested in the route's table (``jwt``, ``forward_auth``, ``cors``...);
- webhook endpoints (exact paths, from policies' ``[webhook]`` tables), whose
  terminal handler is the webhook plugin's endpoint (``sidecar_routes_build``
  in plugins/webhook). An exact path wins over every prefix.

```toml
[inbound]
listen = "127.0.0.1:8443"
service_url = "http://127.0.0.1:8000"

[inbound.routes."/api".jwt]
secret = "env:JWT_SECRET"
```

The listener starts when config.toml has an ``[inbound]`` table or a policy
has a ``[webhook]`` table, and drains with the worker (``serve_runner``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator

from .config import TLS, Listener, Policy, PolicyCore, Timeouts, known_keys, suggest
from .hookspecs import hookimpl
from .outbound import OutboundHandler
from .routes import Route
from .units import Duration

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("sidecar.inbound")

TABLE = "inbound"


class InboundSettings(Listener):
    """config.toml ``[inbound]``."""

    listen: str = "127.0.0.1:8443"
    service_url: str = "http://127.0.0.1:8000"
    # Webhook settings accepted here for compatibility; they belong to the
    # webhook plugin ([webhook] in config.toml), which reads them from here
    # when its own table does not set them. Nothing in core uses them.
    data_dir: str | None = None
    retention: Duration | None = None
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
                        msg = "unknown key" + suggest(str(first["loc"][-1]),
                                                      known_keys(spec.config, tuple(first["loc"][:-1])))
                    raise ValueError(f"{prefix}: {name}.{field}: {msg}") from None
            out[route] = plugins
        return out


class Inbound:
    """One runtime's inbound side: settings and the listener's handler."""

    def __init__(self, runtime: "Runtime") -> None:
        self.rt = runtime
        settings = runtime.extra_settings.get(TABLE)
        self.settings: InboundSettings = settings if isinstance(settings, InboundSettings) else InboundSettings()
        self.configured = TABLE in runtime.settings.extra_tables
        # The outbound listener's handler class on the inbound table, whole paths kept.
        self.handler = OutboundHandler(runtime, listener=TABLE, keep_path=True)
        self.port: int | None = None

    def build_routes(self, build: Any) -> list[Route]:
        """The ``[inbound.routes]`` of config.toml as routes to ``service_url``."""
        rt = self.rt
        s = self.settings
        if not s.routes:
            return []
        core = PolicyCore(limits=rt.settings.limits)
        where = str(rt.settings.path or "config")
        upstream = rt.pools.get(s.service_url, TLS(), Timeouts())
        routes = []
        for prefix, plugins in s.routes.items():
            raw = {k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for k, v in plugins.items()}
            policy = Policy(f"inbound:{prefix}", Path(where), core, plugins, raw)
            routes.append(build(policy, plugins, prefix=prefix, scope="inbound", upstream=upstream,
                                where=where, field_prefix=f"inbound.routes.{prefix}."))
        return routes


def inbound_of(runtime: "Runtime") -> Inbound:
    """The runtime's Inbound (created on first use)."""
    return runtime.service(TABLE, lambda: Inbound(runtime))


@hookimpl
def sidecar_settings_register() -> dict[str, type[Any]]:
    return {TABLE: InboundSettings}


@hookimpl
def sidecar_routes_build(runtime: "Runtime", policies: list[Policy], build: Any) -> dict[str, list[Route]]:
    return {TABLE: inbound_of(runtime).build_routes(build)}


@hookimpl
async def sidecar_listeners_start(runtime: "Runtime", sidecar: Any) -> None:
    from .server import aiohttp_server

    inbound = inbound_of(runtime)
    table = runtime.tables.get(TABLE)
    if not (inbound.configured or (table is not None and table.routes)):
        return
    s = inbound.settings
    runner = aiohttp_server(inbound.handler, runtime, s)
    inbound.port = await sidecar.serve_runner("inbound", runner, s.host, s.port)
    routes = table.routes if table is not None else []
    log.info("inbound listener on %s:%d (%d webhook paths, %d routes)", s.host, inbound.port,
             sum(r.exact for r in routes), sum(not r.exact for r in routes))
