"""auth: inject provider credentials into every outbound request on a route.

```toml
[auth]
type = "bearer"                 # Authorization: Bearer <secret>
secret = "env:HTTPBIN_TOKEN"    # env:NAME | file:/path | vault:path#key[@version]
```
Types: bearer, header, basic, query, oauth2_client_credentials, oauth2_jwt_bearer
(RFC 7523, Google service accounts), aws_sigv4; extra
``[auth.headers]``; per-tenant ``[auth.tenants.<tenant>]``. See docs/auth.md.

PRIORITY 500: innermost of the built-in plugins, so each retry re-injects a
fresh credential and the OAuth2 401-refresh happens next to the upstream.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy.admin import json_response, runtime_of
from proxy.errors import FieldError
from proxy.hookspecs import hookimpl
from proxy.plugins import INJECTS_CREDENTIALS, BuildContext, PluginSpec

from .config import AWS_KEY_FIELDS, LITERAL_CREDENTIAL, LITERAL_OK, SECRET_FIELDS, Config
from .inject import AuthFilter, BasicSlot, Credentials, HeaderSlot, QuerySlot, Secret, Slot
from .jwt_bearer import JwtBearerTokenSource
from .oauth2 import CachedToken, TokenSource
from .sigv4 import Signer
from .state import NAME, AuthState, auth_state
from .vault import SecretsSettings

if TYPE_CHECKING:
    from proxy.runtime import Runtime

PRIORITY = 500


def _credentials(label: str, config: Config, over: dict[str, Any], state: AuthState,
                 route: str) -> Credentials:
    """The slots of one credential set: ``over`` holds the tenant's own values."""
    store = state.runtime.secrets

    def secret(field: str, raw: str | None = None) -> Secret:
        raw = raw or over.get(field) or getattr(config, field)
        ref = store.ref(raw)
        if ref.source == "literal" and field not in LITERAL_OK:
            where = "" if label == "default" else f"tenants.{label}."
            raise FieldError(f"{where}{field}", LITERAL_CREDENTIAL)
        return Secret(ref, state)

    slots: list[Slot] = []
    token: CachedToken | None = None
    signer = None
    t = config.type
    if t == "bearer":
        slots.append(HeaderSlot("Authorization", "Bearer ", secret("secret")))
    elif t == "header":
        assert config.header is not None
        slots.append(HeaderSlot(config.header, config.prefix, secret("secret")))
    elif t == "basic":
        slots.append(BasicSlot(secret("username"), secret("password")))
    elif t == "query":
        assert config.param is not None
        slots.append(QuerySlot(config.param, secret("secret")))
    elif t == "oauth2_client_credentials":
        assert config.token_url is not None
        token = TokenSource(
            token_url=config.token_url, client_id=secret("client_id").ref,
            client_secret=secret("client_secret").ref, scopes=config.scopes, audience=config.audience,
            params=config.token_params, client_auth=config.client_auth,
            refresh_before=config.refresh_before, timeout=config.token_timeout, http=state.runtime.http,
            fetches=state.oauth2_fetches, label=route)
    elif t == "oauth2_jwt_bearer":
        token = JwtBearerTokenSource(
            credentials=secret("credentials").ref, token_url=config.token_url, scopes=config.scopes,
            subject=config.subject, refresh_before=config.refresh_before, timeout=config.token_timeout,
            http=state.runtime.http, fetches=state.oauth2_fetches, label=route)
    elif t == "aws_sigv4":
        signer = _signer(config, over, state, secret)
    headers = {**config.headers, **over.get("headers", {})}
    for name, value in headers.items():
        slots.append(HeaderSlot(name, "", Secret(store.ref(value), state)))
    return Credentials(label, slots, token, signer)


def _signer(config: Config, over: dict[str, Any], state: AuthState, secret: Any) -> Signer:
    """A tenant with its own access key uses its own key set; others the [auth] one
    or, when [auth] has none, botocore's standard credential chain."""
    assert config.service is not None
    keys_from = over if over.get("access_key_id") else {f: getattr(config, f) for f in AWS_KEY_FIELDS}
    keys = None
    if keys_from.get("access_key_id"):
        token = keys_from.get("session_token")
        keys = (secret("access_key_id", keys_from["access_key_id"]),
                secret("secret_access_key", keys_from["secret_access_key"]),
                secret("session_token", token) if token else None)
    region = config.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        raise ValueError("type = \"aws_sigv4\" needs region (or AWS_REGION in the environment)")
    signed = config.payload == "signed" if config.payload else not config.service.startswith("s3")
    return Signer(config.service, region, signed, keys, state.aws_chain() if keys is None else None)


def build(config: Config, ctx: BuildContext) -> AuthFilter:
    rt = ctx.runtime
    state = auth_state(rt)
    needed = SECRET_FIELDS.get(config.type or "", ())
    has_default = config.type is None or all(getattr(config, f) is not None for f in needed)
    default = _credentials("default", config, {}, state, ctx.route) if has_default else None
    tenants = {name: _credentials(name, config, tc.model_dump(exclude_none=True), state, ctx.route)
               for name, tc in config.tenants.items()}
    # Whatever the filter injects must never reach a log (http-rules: credentials).
    secret_headers = {name for name, v in config.headers.items()
                      if rt.secrets.ref(v).source != "literal"}
    for tc in config.tenants.values():
        secret_headers |= {n for n, v in tc.headers.items() if rt.secrets.ref(v).source != "literal"}
    if config.type == "header" and config.header:
        secret_headers.add(config.header)
    if config.type == "aws_sigv4":
        secret_headers.add("X-Amz-Security-Token")
    rt.redactor.add(headers=secret_headers, query_params=[config.param] if config.param else [])
    summary: dict[str, Any] = {"type": config.type, "override": config.override, "unknown_tenant": config.unknown_tenant,
               "tenants": sorted(config.tenants), "headers": sorted({**config.headers})}
    if config.type == "header":
        summary["header"] = config.header
    if config.type == "query":
        summary["param"] = config.param
    if default is not None and default.signer is not None:
        summary["aws_sigv4"] = default.signer.describe()
    return AuthFilter(default, tenants, config.unknown_tenant == "reject", config.override,
                      config.replay_body_limit, summary)


# ---- admin ----------------------------------------------------------------

async def admin_secrets(request: web.Request) -> web.Response:
    return json_response(auth_state(runtime_of(request)).describe())


async def admin_secrets_refresh(request: web.Request) -> web.Response:
    return json_response(await auth_state(runtime_of(request)).refresh())


# ---- hooks ----------------------------------------------------------------

@hookimpl
def sidecar_plugins_register() -> list[PluginSpec]:
    return [PluginSpec(NAME, Config, PRIORITY, build, capabilities=frozenset({INJECTS_CREDENTIALS}),
                       description="inject credentials (env, file, Vault, AWS Secrets Manager) or sign AWS SigV4")]


@hookimpl
def sidecar_settings_register() -> dict[str, type]:
    return {"secrets": SecretsSettings}


@hookimpl
def sidecar_secrets_register(runtime: "Runtime") -> None:
    auth_state(runtime)   # registers the vault: and aws-sm: sources


@hookimpl
def sidecar_policies_loaded(runtime: "Runtime", policies: list[Any]) -> None:
    auth_state(runtime).start()


@hookimpl
async def sidecar_runtime_startup(runtime: "Runtime") -> None:
    state = auth_state(runtime)
    runtime.on_shutdown(state.close)
    # Start-up waits (briefly) for the first reads; with Vault or AWS down the
    # sidecar starts anyway and affected routes answer 503 until it is back.
    if state.vault is not None:
        await state.vault.first_read()
    if state.aws is not None:
        await state.aws.first_read()
    if state.chain is not None:
        await state.chain.first_read()


@hookimpl
def sidecar_admin_routes(runtime: "Runtime", app: web.Application) -> None:
    app.router.add_get("/admin/secrets", admin_secrets)
    app.router.add_post("/admin/secrets/refresh", admin_secrets_refresh)


@hookimpl
def sidecar_health_checks(runtime: "Runtime") -> dict[str, Any]:
    vault = auth_state(runtime).vault
    if vault is None:
        return {}

    async def check() -> dict[str, Any]:
        # The refresh loop's own outcome: a health probe must not add Vault calls.
        d = vault.describe()
        if d["last_error"] is None and d["authenticated"]:
            return {"status": "ok", "latency_ms": None, "error": None, "address": d["address"],
                    "last_success_age_seconds": d["last_success_age_seconds"]}
        # Cached secrets keep serving (up to max_stale): degraded, not down.
        return {"status": "degraded", "latency_ms": None, "error": d["last_error"] or "not authenticated",
                "address": d["address"], "last_success_age_seconds": d["last_success_age_seconds"]}

    return {"vault": check}
