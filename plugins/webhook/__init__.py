"""webhook: verify provider webhooks on the inbound listener, de-duplicate them and
deliver them to the service durably (or pass them through).

```toml
# policies/stripe.toml
[webhook]
path = "/webhooks/stripe"          # on the inbound listener
forward_to = "/hooks/stripe"       # on the service ([inbound] service_url)
scheme = "stripe"
secrets = ["env:STRIPE_WEBHOOK_SECRET", "env:STRIPE_WEBHOOK_SECRET_OLD"]
tolerance = "5m"
max_body = "1MB"
delivery = "durable"               # or "passthrough"
retry = { attempts = 8, base = "1s", max = "5m" }
dedupe_ttl = "24h"
```
Each ``[webhook]`` is an exact route on the inbound listener whose terminal
handler is its endpoint (``sidecar_routes_build``): the policy's
inbound-capable plugins (headers, rate_limit, tracing, jwt, forward_auth...)
wrap it like any route. Scope "inbound": the outbound chains never include
it; a policy may hold only ``[webhook]``. config.toml ``[webhook]`` sets
``data_dir`` and ``retention`` (``WebhookSettings``). Admin: ``GET /admin/webhooks/events?status=&source=``,
``GET /admin/webhooks/events/<id>``, ``POST /admin/webhooks/events/<id>/retry``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy.hookspecs import hookimpl
from proxy.inbound import inbound_of
from proxy.plugins import MAKES_ROUTE, BuildContext, PluginSpec

from .admin import add_routes
from .config import Config, WebhookSettings
from .service import NAME, WebhookService

if TYPE_CHECKING:
    from aiohttp import web

    from proxy.routes import Route
    from proxy.runtime import Runtime

PRIORITY = 0  # never a filter: the endpoint is the terminal handler of its own route


def service_of(runtime: "Runtime") -> WebhookService:
    return runtime.service(NAME, lambda: WebhookService(runtime))


def build(config: Config, ctx: BuildContext) -> None:
    # Webhook routes are built by sidecar_routes_build, with the endpoint as
    # their terminal; this is only reached for a [webhook] table nested in
    # an [inbound.routes] entry.
    raise ValueError("a webhook is declared in a policy file ([webhook] path = ...), not on an inbound route")


@hookimpl
def sidecar_plugins_register() -> list[PluginSpec]:
    return [PluginSpec(NAME, Config, PRIORITY, build, scope="inbound", capabilities=frozenset({MAKES_ROUTE}),
                       description="verify, de-duplicate and durably deliver provider webhooks")]


@hookimpl
def sidecar_settings_register() -> dict[str, type[Any]]:
    return {NAME: WebhookSettings}


@hookimpl
def sidecar_routes_build(runtime: "Runtime", policies: list[Any], build: Any) -> "dict[str, list[Route]]":
    return {"inbound": service_of(runtime).build_routes(policies, build)}


@hookimpl
def sidecar_policies_check(runtime: "Runtime", policies: list[Any]) -> list[str]:
    """Two policies may not claim the same webhook path; a reload may not add
    webhooks to a sidecar whose inbound listener was not started."""
    seen: dict[str, Any] = {}
    problems = []
    # The listener starts once, at start-up (config.toml [inbound], or a
    # webhook then): a webhook a reload adds without it would answer nothing.
    listening = runtime.loaded_at is None or inbound_of(runtime).port is not None
    for p in policies:
        config = p.plugins.get(NAME)
        if config is None:
            continue
        first = seen.setdefault(config.path, p)
        if first is not p:
            problems.append(f"{p.file}: webhook.path: {config.path!r} is already the webhook path of {first.file}")
        if not listening:
            problems.append(f"{p.file}: webhook: the inbound listener is not running (it starts when config.toml "
                            "has [inbound] or a policy has [webhook] at start-up): add [inbound] to config.toml "
                            "and restart the sidecar to serve webhooks")
    return problems


@hookimpl
def sidecar_policies_loaded(runtime: "Runtime", policies: list[Any]) -> None:
    service_of(runtime).update(policies)


@hookimpl
async def sidecar_runtime_startup(runtime: "Runtime") -> None:
    svc = service_of(runtime)
    await svc.start()
    runtime.on_shutdown(svc.stop)


@hookimpl
def sidecar_admin_routes(runtime: "Runtime", app: "web.Application") -> None:
    add_routes(app, lambda: service_of(runtime))
