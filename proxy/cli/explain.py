"""``sidecar explain METHOD URL``: what the sidecar would do with one request.

Offline: it loads config.toml and the policies, compiles the routes as a
start would (nothing listens, nothing is sent), matches the request and
walks the chain. Each plugin shows its effective settings (a secret as its
reference, never a value) and, where the answer does not depend on live
state, what it would do: the rate-limit key and limits, the cache rule, a
disabled route. A filter may explain itself with an ``explain(ex)`` method
returning a dict (third-party plugins included); the built-ins' answers
live here, next to each other, as ``_EXPLAIN``.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import sys
from typing import Any

import orjson
from multidict import CIMultiDict
from yarl import URL

from ..chain import Exchange
from ..config import load_settings
from ..redact import SENSITIVE_HEADERS
from ..secrets import is_reference

_SECRETISH = ("secret", "token", "password", "credential", "private", "api_key", "apikey")
_HIDDEN = "(literal value, hidden)"


def redact(value: Any, sensitive_headers: frozenset[str] | set[str], key: str = "") -> Any:
    """A config dump fit to print: secret-like values only as references."""
    if isinstance(value, dict):
        return {k: redact(v, sensitive_headers, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, sensitive_headers, key) for v in value]
    if isinstance(value, str) and not is_reference(value):
        k = key.lower()
        if k in sensitive_headers or (any(w in k for w in _SECRETISH) and k not in _NOT_SECRET):
            return _HIDDEN
    return value


# Keys that look secret by name and hold none (a rate-limit key spec, a header name).
_NOT_SECRET = {"token_url", "token_params", "token_timeout"}


# ---- what each built-in plugin would do ----------------------------------------

def _rate_limit(f: Any, c: Any, ex: Exchange) -> dict[str, Any]:
    group = f.group_for(ex.method, ex.path) if f.overrides else f.default
    if group is None:
        return {"decision": "no limit applies to this request"}
    key = "(one bucket shared by every request)" if f.key_of is None else f.key_of(ex)
    return {"key": f.config.key, "key_value": key,
            "applies": "route limits" if not group.scope else f"override {group.scope!r}",
            "limits": group.describe(), "on_limit": f.config.on_limit, "enforce": f.config.enforce,
            "decision": "counted against these limits (the verdict depends on live counters)"}


def _cache(f: Any, c: Any, ex: Exchange) -> dict[str, Any]:
    h = ex.headers
    if ex.method not in f.methods:
        if ex.method in ("GET", "HEAD", "OPTIONS", "TRACE"):
            return {"decision": f"{ex.method} is not cached on this route: passes through"}
        return {"decision": "unsafe method: passes through; a 2xx/3xx answer invalidates this URI's entries"}
    cc = ",".join(h.getall("Cache-Control", [])).lower()
    if "no-store" in cc or "Range" in h:
        return {"decision": "bypass (" + ("Range request" if "Range" in h else "request says no-store") + ")"}
    credentialed = f.injects or "Authorization" in h
    if credentialed and not f.authorized:
        keyed = "shared entry; authorized responses are stored only if they allow it (RFC 9111 3.5)"
    elif credentialed:
        keyed = f"per tenant ({ex.tenant or 'no tenant header'})"
    else:
        keyed = "shared by every client"
    return {"decision": "looked up in the cache; a miss is fetched and stored if cacheable",
            "ttl_seconds": f.rules.ttl, "key_headers": list(f.key_headers), "entry": keyed,
            "no_cache": "no-cache" in cc}


def _circuit_breaker(f: Any, c: Any, ex: Exchange) -> dict[str, Any]:
    c = f.breaker.config
    return {"decision": "passes while closed; the live state is in /admin/breakers",
            "opens_after": f"{c.failure_threshold} consecutive failures ({', '.join(map(str, c.failure_statuses))} "
                           "or no answer)"}


def _auth(f: Any, c: Any, ex: Exchange) -> dict[str, Any]:
    creds = c
    who = "default credentials"
    if ex.tenant is not None and ex.tenant in c.tenants:
        creds, who = c.tenants[ex.tenant], f"tenant {ex.tenant}'s credentials"
    elif c.tenants and c.unknown_tenant == "reject":
        return {"decision": f"403: tenant {ex.tenant!r} has no credentials and unknown_tenant = \"reject\""}

    def ref(field: str) -> str:
        return f"<{getattr(creds, field, None) or getattr(c, field)}>"

    t = c.type
    inject: dict[str, str] = {}
    if t == "bearer":
        inject["Authorization"] = "Bearer " + ref("secret")
    elif t == "header":
        inject[str(c.header)] = c.prefix + ref("secret")
    elif t == "basic":
        inject["Authorization"] = f"Basic base64({ref('username')}:{ref('password')})"
    elif t == "query":
        inject[f"?{c.param}="] = ref("secret")
    elif t == "oauth2_jwt_bearer" and not c.token_url:
        inject["Authorization"] = f"Bearer <access token from the token_uri of {ref('credentials')[1:-1]} (RFC 7523)>"
    elif t is not None and "oauth2" in t:
        inject["Authorization"] = f"Bearer <access token from {c.token_url}>"
    for name, value in c.headers.items():
        inject[name] = f"<{value}>" if is_reference(value) else (
            _HIDDEN if name.lower() in SENSITIVE_HEADERS else value)
    out: dict[str, Any] = {"uses": who, "injects": inject}
    if "Authorization" in ex.headers:
        out["client_authorization"] = "replaced" if c.override else "kept (override = false)"
    return out


def _retry(f: Any, c: Any, ex: Exchange) -> dict[str, Any]:
    from plugins.retry import IDEMPOTENT

    if ex.method in IDEMPOTENT or c.idempotency_header in ex.headers:
        return {"decision": f"up to {c.attempts} attempts on {', '.join(map(str, c.on))}, within the retry budget"}
    return {"decision": f"sent once: {ex.method} is not idempotent and carries no {c.idempotency_header}"}


_EXPLAIN = {"auth": _auth, "retry": _retry, "rate_limit": _rate_limit, "cache": _cache, "circuit_breaker": _circuit_breaker}


# ---- matching -------------------------------------------------------------------

def nearest(path: str, prefixes: list[str], n: int = 3) -> list[str]:
    """The route prefixes closest to ``path``: shared leading segments first, then spelling."""
    first = "/" + path.strip("/").split("/")[0]

    def score(p: str) -> tuple[int, float]:
        shared = 0
        for a, b in zip(path.split("/"), p.split("/")):
            if a != b:
                break
            shared += 1
        return (shared, difflib.SequenceMatcher(None, first, p).ratio())

    return sorted(prefixes, key=score, reverse=True)[:n]


def _headers(items: list[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for item in items:
        k, sep, v = item.partition(":")
        if not sep or not k.strip():
            raise SystemExit(f"sidecar explain: --header needs K:V, got {item!r}")
        out.add(k.strip(), v.strip())
    return out


def _chain(rt: Any, route: Any, ex: Exchange) -> list[dict[str, Any]]:
    sensitive = rt.redactor.headers
    out = []
    for f in route.filters:
        spec = rt.specs[f.name]
        config = route.policy.plugins.get(f.name)
        settings = config.model_dump(mode="json") if config is not None else {}
        step: dict[str, Any] = {"plugin": f.name, "priority": spec.priority,
                                "settings": redact(settings, sensitive)}
        try:
            described = f.describe()
        except Exception:  # describing is best effort; a plugin bug must not hide the rest
            described = {}
        if described:
            step["state"] = redact(described, sensitive)
        own = getattr(f, "explain", None)
        if own is not None:
            would = redact(own(ex), sensitive)
        elif f.name in _EXPLAIN:  # built-ins show references, never values
            would = _EXPLAIN[f.name](f, config, ex)
        else:
            would = None
        if would:
            step["would"] = would
        out.append(step)
    return out


def explain(config: str | None, method: str, url: str, headers: CIMultiDict[str]) -> tuple[int, dict[str, Any]]:
    from ..inbound import inbound_of
    from ..routes import RouteTable
    from ..runtime import Runtime

    settings = load_settings(config)
    u = URL(url)
    path, query = u.raw_path or "/", u.raw_query_string
    listener = "outbound"

    async def run() -> tuple[int, dict[str, Any]]:
        nonlocal listener
        rt = Runtime(settings)
        try:
            policies = rt.load_policies()
            rt.tables, _ = rt.compile(policies)
            rt.table = rt.tables["outbound"]
            rt.policies = policies
            inbound = inbound_of(rt)
            inbound_port_ = inbound.settings.port if inbound.configured or _webhooks(policies) else None
            if u.is_absolute() and u.port is not None:
                if u.port == settings.admin.port:
                    return 1, {"listener": "admin", "error": "the admin listener serves /health, /ready, "
                                                             "/metrics and /admin/*; it proxies nothing"}
                if inbound_port_ is not None and u.port == inbound_port_:
                    listener = "inbound"
                elif u.port != settings.outbound.port:
                    return 1, {"error": f"port {u.port} is none of the sidecar's listeners (outbound "
                                        f"{settings.outbound.port}, admin {settings.admin.port}"
                                        + (f", inbound {inbound_port_}" if inbound_port_ else "") + ")"}
            out: dict[str, Any] = {"request": {"method": method, "path": path, "query": query,
                                               "headers": rt.redactor.headers_dict(headers)},
                                   "listener": listener}
            if listener == "inbound":
                hooks = _webhooks(policies)
                if path in hooks:
                    p = hooks[path]
                    cfg = p.plugins["webhook"]
                    out["webhook"] = {"policy": p.name, "file": str(p.file),
                                      "settings": redact(cfg.model_dump(mode="json"), rt.redactor.headers)}
                    if not p.core.enabled:
                        out["decision"] = "503 route_disabled: the policy sets enabled = false"
                    else:
                        out["forwards_to"] = inbound.settings.service_url + (cfg.forward_to or path)
                    return 0, out
                table = rt.tables.get("inbound") or RouteTable([])
                prefixes = sorted(hooks) + [r.prefix for r in table.routes if not r.exact]
            else:
                table = rt.table
                prefixes = [r.prefix for r in table.routes]
            m = table.match(path)
            if m is None:
                out["error"] = f"no route matches {path} on the {listener} listener"
                out["nearest"] = nearest(path, prefixes)
                return 1, out
            route, rest = m
            if listener == "inbound":
                rest = path
            ex = Exchange(route, method, rest, query, headers.copy(), request_id="explain", started=0.0,
                          max_body=route.max_body, target=path + ("?" + query if query else ""),
                          tenant=headers.get(route.tenant_header), client_ip="127.0.0.1")
            core = route.policy.core
            out["route"] = {"name": route.name, "prefix": route.prefix, "file": str(route.policy.file),
                            "enabled": core.enabled, "tenant_header": route.tenant_header,
                            "tenant": ex.tenant,
                            "timeouts": core.timeouts.model_dump(), "limits": core.limits.model_dump()}
            if not core.enabled:
                out["decision"] = "503 route_disabled: the policy sets enabled = false; no plugin runs"
                out["chain"] = []
                return 0, out
            if route.upstream is not None:
                up = URL(route.upstream.url)
                target = up.raw_path.rstrip("/") + rest + ("?" + query if query else "")
                out["upstream"] = str(up.origin()) + target
            out["chain"] = _chain(rt, route, ex)
            return 0, out
        finally:
            await rt.pools.close()
            await rt.state.close()

    return asyncio.run(run())


def _webhooks(policies: list[Any]) -> dict[str, Any]:
    return {p.plugins["webhook"].path: p for p in policies if "webhook" in p.plugins}


def render_text(out: dict[str, Any]) -> str:
    lines = []
    req = out.get("request")
    if req:
        q = "?" + req["query"] if req["query"] else ""
        lines.append(f"{req['method']} {req['path']}{q}  (listener: {out['listener']})")
    if "error" in out:
        lines.append(f"error: {out['error']}")
        if out.get("nearest"):
            lines.append("nearest route prefixes: " + ", ".join(out["nearest"]))
        return "\n".join(lines)
    if "webhook" in out:
        w = out["webhook"]
        lines.append(f"webhook endpoint of policy {w['policy']} ({w['file']})")
        if "decision" in out:
            lines.append(f"decision: {out['decision']}")
        else:
            lines.append(f"  verified with scheme {w['settings'].get('scheme')}, then sent to {out['forwards_to']}")
        return "\n".join(lines)
    r = out["route"]
    lines.append(f"route:    {r['prefix']}  (policy {r['name']}, {r['file']})")
    if r["tenant"] is not None:
        lines.append(f"tenant:   {r['tenant']}  (from {r['tenant_header']})")
    if not r["enabled"]:
        lines.append(f"decision: {out['decision']}")
        return "\n".join(lines)
    if "upstream" in out:
        lines.append(f"upstream: {out['upstream']}")
    t = r["timeouts"]
    lines.append(f"timeouts: connect {t['connect']:g}s, total {t['total']:g}s, idle {t['idle']:g}s")
    lines.append("chain (outermost first):" if out["chain"] else "chain: (no plugins)")
    for step in out["chain"]:
        lines.append(f"  {step['plugin']} (priority {step['priority']})")
        lines.append(f"    settings: {orjson.dumps(step['settings']).decode()}")
        would = step.get("would")
        if would:
            for k, v in would.items():
                lines.append(f"    {k}: {v if isinstance(v, str) else orjson.dumps(v).decode()}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    code, out = explain(args.config, args.method.upper(), args.url, _headers(args.header))
    if args.json:
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")
    else:
        print(render_text(out), file=sys.stdout if code == 0 else sys.stderr)
    return code
