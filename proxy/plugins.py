"""The plugin manager: built-in plugins, entry points and dotted paths from config.

One manager is built per app (pytest builds one per run): there is no module
level registry, so a test can build as many apps as it likes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import pluggy
from pydantic import BaseModel

from . import hookspecs
from .errors import ConfigError

if TYPE_CHECKING:
    from .chain import Filter
    from .config import Policy
    from .runtime import Runtime

ENTRY_POINT_GROUP = "sidecar.plugins"

#: Capability: the plugin injects a credential into upstream requests.
INJECTS_CREDENTIALS = "injects_credentials"

#: Capability: the plugin's table makes its policy a route of the plugin's
#: scope (``[webhook]``: an exact route on the inbound listener), so the
#: policy's other plugins of that scope have a route to wrap.
MAKES_ROUTE = "makes_route"

#: Built-in plugin modules, registered on every manager.
BUILTIN_PLUGINS = (
    "plugins.auth",
    "plugins.cache",
    "plugins.circuit_breaker",
    "plugins.cors",
    "plugins.fallback",
    "plugins.forward_auth",
    "plugins.headers",
    "plugins.jwt",
    "plugins.rate_limit",
    "plugins.retry",
    "plugins.tracing",
    "plugins.webhook",
    "proxy.client",
    "proxy.fixtures",
    "proxy.inbound",
    "proxy.routes",
)


@dataclass
class BuildContext:
    """What a plugin's ``build`` gets besides its own validated config."""

    route: str          # the route's name: the policy name (file stem), "inbound:/api", "webhook:stripe"
    policy: "Policy"
    runtime: "Runtime"
    # Which listener's route this is: "outbound" (service -> provider) or
    # "inbound" (provider or browser -> service).
    scope: str = "outbound"

    def route_has(self, capability: str) -> bool:
        """Whether another plugin on this route declares ``capability``."""
        specs = self.runtime.specs
        return any(capability in specs[n].capabilities for n in self.policy.plugins if n in specs)


@dataclass(frozen=True)
class PluginSpec:
    """A plugin as the sidecar sees it.

    ``name`` is its policy table (``[headers]``); ``config`` validates that
    table; ``priority`` orders the chain (higher runs first, outermost; ties by
    name); ``build(config, ctx)`` returns the route's Filter, or None to stay
    out of the chain. ``scope`` says where the plugin may be used: "outbound"
    routes, "inbound" routes, or "both". ``capabilities`` declares what the
    plugin does that other plugins must know about, instead of them
    recognising it by name (``INJECTS_CREDENTIALS``: every upstream request
    of a route holding it is an authorized one, so the cache keys per tenant).
    """

    name: str
    config: type[BaseModel]
    priority: int
    build: Callable[[Any, BuildContext], "Filter | None"]
    description: str = ""
    scope: str = "outbound"
    capabilities: frozenset[str] = frozenset()
    origin: str = field(default="built-in", compare=False)


def make_plugin_manager(extra: list[str] | tuple[str, ...] = (), *, entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh manager with the built-in plugins, entry points and ``extra`` dotted paths."""
    pm = pluggy.PluginManager("sidecar")
    pm.add_hookspecs(hookspecs)
    for dotted in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(dotted), name=dotted)
    if entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    problems = []
    for dotted in extra:
        try:
            module = importlib.import_module(dotted)
        except Exception as e:  # an operator's typo must say which module and why
            problems.append(f"config: sidecar.plugins: cannot import {dotted!r}: {e}")
            continue
        if not pm.is_registered(module):
            pm.register(module, name=dotted)
    if problems:
        raise ConfigError(problems)
    pm.check_pending()
    return pm


def collect_specs(pm: pluggy.PluginManager) -> dict[str, PluginSpec]:
    """Every registered PluginSpec by table name; a duplicate name is an error."""
    specs: dict[str, PluginSpec] = {}
    dist_of = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    for impl in pm.hook.sidecar_plugins_register.get_hookimpls():
        origin = "built-in" if impl.plugin_name in BUILTIN_PLUGINS else "config"
        dist = dist_of.get(id(impl.plugin))
        if dist is not None:
            origin = f"entry point ({dist.project_name} {dist.version})"
        for spec in cast("list[PluginSpec]", impl.function() or []):
            if spec.name in specs:
                raise ConfigError([f"plugins: {spec.name}: registered twice "
                                   f"({specs[spec.name].origin} and {origin})"])
            specs[spec.name] = PluginSpec(**{**spec.__dict__, "origin": origin})
    return specs


def collect_settings_models(pm: pluggy.PluginManager) -> dict[str, type[BaseModel]]:
    out: dict[str, type[BaseModel]] = {}
    for result in pm.hook.sidecar_settings_register():
        out.update(result or {})
    return out


def ordered(specs: list[PluginSpec]) -> list[PluginSpec]:
    """Chain order: higher PRIORITY first (outermost), ties broken by name."""
    return sorted(specs, key=lambda s: (-s.priority, s.name))
