"""Every hook a plugin may implement. Hooks run at start-up, reload and shutdown only.

Conventions (pytest, datasette): prefix ``sidecar_``, subject then action,
keyword arguments. The data plane never calls a hook: plugins hand back
filters that are compiled into per-route chains at load time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from aiohttp import web

    from .plugins import PluginSpec
    from .runtime import Runtime

hookspec = pluggy.HookspecMarker("sidecar")
hookimpl = pluggy.HookimplMarker("sidecar")


@hookspec
def sidecar_plugins_register() -> "list[PluginSpec]":
    """Return the PluginSpec objects this module provides.

    Each spec names its policy table (``[rate_limit]``), its Config model, its
    PRIORITY and the ``build(config, ctx)`` factory that returns the filter for
    one route. Called once when the plugin manager is built.
    """


@hookspec
def sidecar_settings_register() -> "dict[str, type[Any]]":
    """Return extra config.toml tables this plugin owns, as ``{table name: pydantic model}``.

    The sidecar validates each table with its model at load time and makes the
    result available as ``runtime.extra_settings[name]``.
    """


@hookspec
def sidecar_secrets_register(runtime: "Runtime") -> None:
    """Add secret sources with ``runtime.secrets.register(prefix, factory)`` (``vault:``).

    Called once per runtime when it is built, before any policy is compiled,
    so every plugin's ``build`` can resolve references of every source.
    """


@hookspec
def sidecar_runtime_startup(runtime: "Runtime") -> Any:
    """Called once per worker process after the runtime is built and before it listens.

    May return an awaitable, which is awaited. Start background tasks and open
    connections here; register their cleanup with ``runtime.on_shutdown``.
    """


@hookspec
def sidecar_runtime_shutdown(runtime: "Runtime") -> Any:
    """Called once per worker process after the listeners have drained.

    May return an awaitable, which is awaited.
    """


@hookspec
def sidecar_admin_routes(runtime: "Runtime", app: "web.Application") -> None:
    """Add endpoints to the admin listener's aiohttp application (``app.router.add_get``...).

    Called once when the admin application is built.
    """


@hookspec
def sidecar_policies_loaded(runtime: "Runtime", policies: "list[Any]") -> None:
    """Called after a policy set has been validated and compiled, at start-up and on every reload.

    Lets a plugin refresh state derived from the whole set (for example the
    inbound webhook routes). Not called when a reload is rejected.
    """


@hookspec
def sidecar_policies_check(runtime: "Runtime", policies: "list[Any]") -> "list[str]":
    """Check a validated policy set as a whole before it goes live; return problems.

    Each problem is one ``file: field: reason`` line (two files claiming the
    same route prefix or webhook path, for instance). Run by start-up, by
    every reload and by ``sidecar validate``; any problem rejects the set and
    the previous one keeps serving. Return an empty list when all is well.
    """


@hookspec
def sidecar_routes_build(runtime: "Runtime", policies: "list[Any]", build: Any) -> "dict[str, list[Any]]":
    """Contribute routes to listeners other than the outbound one; return ``{listener: [Route]}``.

    Called while a policy set is compiled (start-up, every reload, ``sidecar
    validate``), before it goes live. ``build(policy, plugins, prefix=,
    scope=, upstream=, terminal=, where=, field_prefix=, exact=)`` is
    ``Runtime.build_route`` bound to this compilation: filters whose config
    did not change are reused (their state survives the reload) and build
    problems reject the whole set. The inbound listener's routes and the
    webhook endpoints (``exact=True``, the endpoint as ``terminal``) are
    built here.
    """


@hookspec
def sidecar_listeners_start(runtime: "Runtime", sidecar: Any) -> Any:
    """Start extra listeners beside the outbound and admin ones (the inbound webhook listener).

    Use ``await sidecar.serve_runner(name, runner, host, port)`` so the
    listener shares the worker's SO_REUSEPORT setting and SIGTERM drain. May
    return an awaitable, which is awaited.
    """


@hookspec
def sidecar_health_checks(runtime: "Runtime") -> "dict[str, Any]":
    """Return the dependencies this plugin adds to ``/health/detailed``, as
    ``{name: async callable}``; each call returns ``{"status": "ok" | "degraded"
    | "down", "latency_ms": float | None, "error": str | None, ...}`` (Vault,
    for instance). Called per /health/detailed request, never on the data plane.
    """
