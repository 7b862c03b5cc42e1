"""The runtime of one worker process: settings, plugins, compiled routes, state.

The control plane lives here: it validates policies, asks each plugin's
factory for a filter and compiles one chain per route. A reload swaps the
route table in one assignment; in-flight requests keep the route they started
with, and a bad policy set leaves the last good one serving.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pluggy

from .accesslog import AccessLog
from .chain import Exchange, Filter, Handler, ProxyResponse, compile_chain, fuse
from .client import TABLE as CLIENT_TABLE, ClientSettings, HttpClient
from .config import (Policy, Settings, config_digest, load_policies, validate_extra_settings)
from .errors import ConfigError, RouteDisabled
from .fastclient import FastUpstream
from .fastserver.express import Express
from .fixtures import terminal_for
from .logs import identifier_hasher, identity_hider
from .metrics import Metrics
from .plugins import (MAKES_ROUTE, BuildContext, PluginSpec, collect_settings_models, collect_specs,
                      make_plugin_manager, ordered)
from .record import Recorder, client_ip
from .redact import Redactor
from .routes import Route, RouteTable
from .secrets import SecretStore
from .state import make_state
from .upstream import Upstream, UpstreamPools

log = logging.getLogger("sidecar.runtime")
T = TypeVar("T")


async def _disabled(ex: Exchange) -> ProxyResponse:
    raise RouteDisabled()


class Runtime:
    """Everything one worker needs; built per app, never a module-level singleton."""

    def __init__(self, settings: Settings, pm: pluggy.PluginManager | None = None,
                 worker_id: int = 0) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.pm = pm or make_plugin_manager(settings.sidecar.plugins)
        self.specs: dict[str, PluginSpec] = collect_specs(self.pm)
        self.extra_settings = validate_extra_settings(settings, collect_settings_models(self.pm),
                                                      context={"plugin_specs": self.specs})
        self.metrics = Metrics()
        self.redactor = Redactor(settings.logging.redact_headers)
        self.secrets = SecretStore()
        # Objects plugins share across their routes for this runtime (a tracer
        # provider, a Vault client...), by plugin name. Never module globals.
        self.services: dict[str, Any] = {}
        self.state = make_state(settings.state, settings.sidecar.service)
        self.pools = UpstreamPools(settings.outbound.pool_size, settings.outbound.pool_idle_timeout,
                                   client=settings.outbound.client, limits=settings.limits)
        self.accesslog = AccessLog(settings.logging.access_log, worker=worker_id)
        # The HTTP client plugins share for their own requests (tokens, JWKS,
        # forward_auth, webhook delivery); closed at stop().
        client_settings = self.extra_settings.get(CLIENT_TABLE)
        self.http = HttpClient(client_settings if isinstance(client_settings, ClientSettings) else ClientSettings(),
                               settings.base_dir, where=str(settings.path or "config"))
        self.table = RouteTable([])
        # Every listener's route table by listener name ("outbound" is ``table``).
        self.tables: dict[str, RouteTable] = {"outbound": self.table}
        self.policies: list[Policy] = []
        self.loaded_at: float | None = None
        self._filters: dict[tuple[str, str, str], Filter] = {}
        # Filters a reload dropped, waiting for in-flight requests before close().
        self._retiring: list[Filter] = []
        # Upstream pools a reload left without a route, closed after the drain timeout.
        self._retiring_pools: list[Any] = []
        self._on_shutdown: list[Callable[[], Any]] = []
        self._reload_lock = asyncio.Lock()
        self._log_headers = settings.logging.log_headers
        # The data plane's one call per request, on every listener: metrics
        # and the access-log line (proxy/record.py, compiled with the request path).
        self.access = Recorder(self.metrics, self.accesslog, self.redactor, self._log_headers).access
        self.pm.hook.sidecar_secrets_register(runtime=self)
        admin_token = settings.admin.token
        self.admin_token = self.secrets.ref(admin_token) if admin_token else None
        # (client, tenant) as access-log lines show them; keyed hashes once
        # start() resolved [logging] hash_key.
        # The last reload's outcome, for /admin/config and the dashboard.
        self.last_reload: dict[str, Any] | None = None

    # ---- control plane -------------------------------------------------

    @property
    def plugin_configs(self) -> dict[str, type]:
        return {name: spec.config for name, spec in self.specs.items()}

    def load_policies(self) -> list[Policy]:
        """Read and validate policies/*.toml (raises ConfigError with every problem)."""
        policies = load_policies(self.settings, self.plugin_configs)
        problems = self.set_problems(policies)
        if problems:
            raise ConfigError(problems)
        return policies

    def set_problems(self, policies: list[Policy]) -> list[str]:
        """What is wrong with a set of individually valid policies: plugins
        outside their scope, and the whole-set checks."""
        problems = []
        for p in policies:
            outbound = p.core.route is not None
            inbound = any(MAKES_ROUTE in self.specs[n].capabilities and self.specs[n].scope != "outbound"
                          for n in p.plugins)
            for name in p.plugins:
                spec = self.specs[name]
                if MAKES_ROUTE in spec.capabilities:
                    continue
                if spec.scope == "outbound" and not outbound:
                    problems.append(f"{p.file}: {name}: needs an outbound route (set route and upstream)")
                elif spec.scope == "inbound" and not inbound:
                    problems.append(f"{p.file}: {name}: wraps inbound routes only: use it in config.toml "
                                    f"[inbound.routes.\"/prefix\".{name}] or in a policy with [webhook]")
                elif spec.scope == "both" and not (outbound or inbound):
                    problems.append(f"{p.file}: {name}: this policy has no route to wrap "
                                    "(set route and upstream, or add [webhook])")
        return problems + self.check_set(policies)

    def check_set(self, policies: list[Policy]) -> list[str]:
        """Whole-set checks every plugin contributes (``sidecar_policies_check``)."""
        problems: list[str] = []
        for found in self.pm.hook.sidecar_policies_check(runtime=self, policies=policies):
            problems.extend(found or [])
        return problems

    def compile(self, policies: list[Policy]) -> tuple[dict[str, RouteTable], dict[tuple[str, str, str], Filter]]:
        """Build every route of every listener; reuses a filter whose config did not change.

        Outbound routes come from policies' ``route``/``upstream``; other
        listeners' routes (inbound routes, webhook endpoints) from the
        ``sidecar_routes_build`` hook, with the same builder. Returns the route
        table of each listener by name and the filters now in use.
        """
        routes: list[Route] = []
        filters_now: dict[tuple[str, str, str], Filter] = {}
        problems: list[str] = []
        for policy in policies:
            core = policy.core
            if core.route is None or core.upstream is None:
                continue
            try:
                upstream = self.pools.get(core.upstream, core.tls, core.timeouts, core.limits)
            except OSError as e:   # ssl.SSLError included: the ca_bundle cannot be loaded
                problems.append(f"{policy.file}: tls.ca_bundle: cannot load {core.tls.ca_bundle}: "
                                f"{e.strerror or type(e).__name__}")
                continue
            # A disabled route keeps its place in the table (no other route
            # catches its paths) and answers 503 route_disabled, no plugin run.
            if core.enabled:
                try:   # mode = "simulate" | "record": its own terminal (proxy/fixtures.py)
                    terminal = terminal_for(self, policy, upstream)
                except ConfigError as e:
                    problems += e.problems
                    continue
            else:
                terminal = _disabled
            routes.append(self.build_route(
                policy, policy.plugins if core.enabled else {}, prefix=core.route, scope="outbound",
                upstream=upstream, terminal=terminal, where=str(policy.file),
                filters_now=filters_now, problems=problems))
        by_listener: dict[str, list[Route]] = {"outbound": routes}

        def build(policy: Policy, plugins: dict[str, Any], **kw: Any) -> Route:
            return self.build_route(policy, plugins, filters_now=filters_now, problems=problems, **kw)

        for found in self.pm.hook.sidecar_routes_build(runtime=self, policies=policies, build=build):
            for listener, extra in (found or {}).items():
                by_listener.setdefault(listener, []).extend(extra)
        if problems:
            raise ConfigError(problems)
        return {name: RouteTable(rs) for name, rs in by_listener.items()}, filters_now

    def build_route(self, policy: Policy, plugins: dict[str, Any], *, prefix: str, scope: str,
                    upstream: Upstream | None = None, terminal: Handler | None = None, where: str,
                    filters_now: dict[tuple[str, str, str], Filter], problems: list[str],
                    field_prefix: str = "", exact: bool = False) -> Route:
        """The one route builder: outbound policies, inbound routes and webhook
        endpoints all become a Route the same way.

        ``plugins`` maps plugin names to validated configs; those whose scope
        admits ``scope`` ("outbound" | "inbound") are built (or reused when
        their config table is unchanged, keyed by policy name, plugin and
        digest) and nested, by PRIORITY, around ``terminal`` (default: send
        to ``upstream``). Build problems are appended to ``problems`` as
        ``where: field_prefix+plugin: reason``; the route is still returned
        so every problem of the set is reported in one pass. ``exact``: the
        route matches its path exactly (a webhook endpoint), before prefixes.
        """
        chain: list[Filter] = []
        specs = ordered([self.specs[n] for n in plugins if self.specs[n].scope in (scope, "both")])
        # A build may read what other plugins of the route declare
        # (ctx.route_has): a filter is reused only while that is unchanged too
        # (the cache built before [auth] was added would not key per tenant).
        caps = ",".join(sorted({c for n in policy.plugins if n in self.specs for c in self.specs[n].capabilities}))
        for spec in specs:
            key = (policy.name, spec.name, config_digest(policy.raw.get(spec.name)) + "|" + caps)
            f = self._filters.get(key) or filters_now.get(key)
            if f is None:
                try:
                    f = spec.build(plugins[spec.name], BuildContext(policy.name, policy, self, scope))
                except (ConfigError, ValueError) as e:
                    field = getattr(e, "field", None)
                    problems.append(f"{where}: {field_prefix}{spec.name}{'.' + field if field else ''}: {e}")
                    continue
            if f is None:
                continue
            f.name = spec.name
            filters_now[key] = f
            chain.append(f)
        express = None
        if terminal is None:
            if upstream is None:
                raise ValueError("build_route: a route needs an upstream or a terminal handler")
            observe = self._upstream_observe(policy.name)
            terminal = _terminal(upstream, observe)
            if isinstance(upstream, FastUpstream) and all(f.sync for f in chain):
                express = Express(fuse(chain, terminal), upstream, observe)
        core = policy.core
        limits = core.limits
        return Route(name=policy.name, prefix=prefix, policy=policy, upstream=upstream,
                     filters=chain, handler=compile_chain(chain, terminal),
                     tenant_header=core.tenant_header, max_body=limits.max_request_body,
                     max_header_size=limits.max_header_size, max_headers=limits.max_headers,
                     total_timeout=core.timeouts.total, exact=exact, express=express)

    def _upstream_observe(self, name: str) -> Callable[[float], None]:
        return self.metrics.batched_histogram(self.metrics.upstream_duration.labels(name)).observe

    def _terminal(self, name: str, upstream: Upstream) -> Callable[[Exchange], Awaitable[ProxyResponse]]:
        """The route ``name``'s handler that sends to ``upstream``, timed."""
        return _terminal(upstream, self._upstream_observe(name))

    def apply(self, policies: list[Policy]) -> None:
        """Compile and swap in a policy set (raises ConfigError, leaving the old set)."""
        tables, filters = self.compile(policies)
        dropped = [f for k, f in self._filters.items() if k not in filters]
        gone_pools = self.pools.retain({getattr(r.upstream, "pool_key", None) for t in tables.values()
                                        for r in t.routes if r.upstream is not None})
        # One listener's table and the others' are swapped together (no await between).
        self.tables, self.table, self._filters, self.policies = tables, tables["outbound"], filters, policies
        self.loaded_at = time.time()
        self.pm.hook.sidecar_policies_loaded(runtime=self, policies=policies)
        if dropped or gone_pools:
            # In-flight requests may still be inside a dropped filter or use a
            # pool of an upstream no route names any more: close them once they
            # have had the drain timeout to finish (or at stop(), whichever
            # comes first).
            self._retiring.extend(dropped)
            self._retiring_pools.extend(gone_pools)
            asyncio.get_running_loop().call_later(
                self.settings.sidecar.drain_timeout,
                lambda: asyncio.ensure_future(self._close_retired(dropped, gone_pools)))

    async def _close_retired(self, filters: list[Filter], pools: Sequence[Any] = ()) -> None:
        for p in pools:
            if p in self._retiring_pools:
                self._retiring_pools.remove(p)
                try:
                    await self.pools.close_one(p)
                except Exception:
                    log.exception("closing an upstream pool failed")
        for f in filters:
            if f in self._retiring:
                self._retiring.remove(f)
                try:
                    await f.close()
                except Exception:
                    log.exception("closing filter %s failed", f.name)

    async def reload(self) -> list[str]:
        """Re-read policies/; returns the problems (empty when the new set is live)."""
        async with self._reload_lock:
            try:
                self.apply(self.load_policies())
            except ConfigError as e:
                self.last_reload = {"ok": False, "at": time.time(), "problems": e.problems}
                self.metrics.reloads.labels("rejected").inc()
                log.error("policy reload rejected; the previous policy set keeps serving:\n%s",
                          "\n".join(e.problems))
                return e.problems
            self.last_reload = {"ok": True, "at": time.time(), "problems": []}
            self.metrics.reloads.labels("ok").inc()
            log.info("policies reloaded: %d routes", len(self.table.routes))
            return []

    async def start(self) -> None:
        """Load policies, run start-up hooks. Raises ConfigError on a bad set."""
        # Access-log fields other plugins of the core add (proxy/accesslog.py
        # add_field): the client address, hashed with the tenant under
        # [logging] hash_identifiers; the provider's own request id.
        al = self.accesslog
        if self.settings.logging.hash_identifiers:
            h = identifier_hasher(self.secrets, self.settings)
            al.add_field("tenant", render=h)
            al.add_field("client", client_ip, render=h)
            al.add_field("decisions", render=identity_hider(h))
        else:
            al.add_field("client", client_ip)
        al.add_field("upstream_request_id", _upstream_request_id)
        self.apply(self.load_policies())
        await self._connect_state()
        self.metrics.start_flushing()
        for result in self.pm.hook.sidecar_runtime_startup(runtime=self):
            if inspect.isawaitable(result):
                await result

    async def _connect_state(self) -> None:
        """Reach the state backend before traffic: a cluster client that maps its
        slots under the first burst drops connections in use (redis-py 8.1).
        A backend that is down must not stop the sidecar: plugins answer per
        their fail-open setting until it is back."""
        try:
            await self.state.connect()
        except Exception as e:
            log.warning("state backend %s unreachable at start (%s); plugins answer per their fail-open "
                        "setting until it is back", self.state.kind, type(e).__name__)

    def service(self, name: str, factory: Callable[[], T]) -> T:
        """The object a plugin shares across its routes in this runtime (a
        registry, a client, a store), made by ``factory`` on first use."""
        obj = self.services.get(name)
        if obj is None:
            obj = self.services[name] = factory()
        return obj

    def route_filters(self, plugin: str) -> dict[str, Filter]:
        """The live filter of ``plugin`` on each route, by policy name (admin views)."""
        return {r.name: f for t in self.tables.values() for r in t.routes for f in r.filters
                if f.name == plugin}

    def on_shutdown(self, callback: Callable[[], Any]) -> None:
        """Register a cleanup (sync or async) run at shutdown, last registered first."""
        self._on_shutdown.append(callback)

    async def stop(self) -> None:
        for result in self.pm.hook.sidecar_runtime_shutdown(runtime=self):
            if inspect.isawaitable(result):
                await result
        for cb in reversed(self._on_shutdown):
            try:
                r = cb()
                if inspect.isawaitable(r):
                    await r
            except Exception:
                log.exception("shutdown callback failed")
        await self._close_retired(list(self._retiring), list(self._retiring_pools))
        for f in self._filters.values():
            try:
                await f.close()
            except Exception:
                log.exception("closing filter %s failed", f.name)
        self._filters.clear()
        await self.pools.close()
        await self.http.close()
        await self.state.close()
        self.metrics.stop_flushing()
        self.accesslog.close()


def _terminal(upstream: Upstream, observe: Callable[[float], None]) -> Callable[[Exchange], Awaitable[ProxyResponse]]:
    """A route's innermost handler: send to the upstream, timed (the
    ``upstream_ms`` of the access log, the upstream duration histogram)."""
    send = upstream.send
    loop_time = time.monotonic

    async def terminal(ex: Exchange) -> ProxyResponse:
        t0 = loop_time()
        try:
            return await send(ex)
        finally:
            took = loop_time() - t0
            observe(took)
            ex.vars["upstream_s"] = took  # rounded to ms when a log line is made

    return terminal


def _upstream_request_id(ex: Exchange | None) -> str | None:
    return ex.vars.get("upstream_request_id") if ex is not None else None
