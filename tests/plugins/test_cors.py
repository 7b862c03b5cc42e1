"""cors: config validation, preflights answered by the sidecar, headers on actual requests."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from plugins.cors import Config
from tests.support.inbound import inbound_config, inbound_url

APP = "https://app.example.com"


def cors_config(service_url: str, table: str, extra: str = "") -> str:
    return inbound_config(service_url, extra=f"""
        [inbound.routes."/api".cors]
        {table}
        {extra}
        """)


STRICT = f"""allow_origins = ["{APP}"]
        allow_methods = ["GET", "POST"]
        allow_headers = ["Authorization", "Content-Type"]
        expose_headers = ["X-Total"]
        allow_credentials = true
        max_age = "10m"
"""


@pytest.mark.parametrize("table,fragment", [
    ({"allow_origins": ["*"], "allow_credentials": True}, "cannot be used with allow_credentials"),
    ({"allow_origins": [APP], "allow_headers": ["*"], "allow_credentials": True}, "cannot be used"),
    ({"allow_origins": ["*", APP]}, "list it alone"),
    ({"allow_origins": ["https://app.example.com/path"]}, "an origin is"),
    ({"allow_origins": ["app.example.com"]}, "an origin is"),
    ({"allow_origins": ["null"]}, "an origin is"),
    ({"allow_origins": []}, "at least 1"),
    ({"allow_origins": [APP], "allow_methods": ["GE T"]}, "not a method"),
    ({"allow_origins": [APP], "allow_headers": ["Bad Name"]}, "not a valid header name"),
    ({"allow_origins": [APP], "max_age": "soon"}, "invalid duration"),
    ({"allow_origins": [APP], "alow_methods": ["GET"]}, "Extra inputs"),
])
def test_config_rejects(table, fragment):
    with pytest.raises(ValidationError) as e:
        Config(**table)
    assert fragment in str(e.value)


def test_config_normalises_origins():
    c = Config(allow_origins=["HTTPS://App.Example.com:8443"], allow_methods=["GET", "PATCH"])
    assert c.allow_origins == ["https://app.example.com:8443"] and c.allow_methods == ["GET", "PATCH"]


def test_cors_is_refused_on_an_outbound_policy(tmp_path):
    from proxy.cli import check
    from tests.support.sidecar import write_config

    path = write_config(tmp_path, {"p": f'[cors]\nallow_origins = ["{APP}"]\n'})
    problems = check(str(path))
    assert problems == [f"{path.parent / 'policies' / 'p.toml'}: cors: wraps inbound routes only: use it in "
                        'config.toml [inbound.routes."/prefix".cors] or in a policy with [webhook]'], problems


async def test_preflight_from_an_allowed_origin_is_answered_by_the_sidecar(sidecar_factory, upstream, client):
    sc = await sidecar_factory({}, cors_config(upstream.url, STRICT))
    async with client.options(f"{inbound_url(sc)}/api/orders", headers={
            "Origin": APP, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"}) as r:
        assert r.status == 204 and await r.read() == b""
        h = r.headers
        assert h["Access-Control-Allow-Origin"] == APP
        assert h["Access-Control-Allow-Methods"] == "GET, POST"
        assert h["Access-Control-Allow-Headers"] == "Authorization, Content-Type"
        assert h["Access-Control-Allow-Credentials"] == "true"
        assert h["Access-Control-Max-Age"] == "600"
        assert h["Vary"] == "Origin"
    assert upstream.seen == []
    (line,) = await sc.wait_access_lines(1)
    assert line["route"] == "inbound:/api" and line["decisions"]["cors"] == "preflight"


async def test_preflight_from_another_origin_is_403(sidecar_factory, upstream, client):
    sc = await sidecar_factory({}, cors_config(upstream.url, STRICT))
    async with client.options(f"{inbound_url(sc)}/api/orders", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}) as r:
        assert r.status == 403
        assert r.headers["X-Sidecar-Error"] == "cors_origin_not_allowed"
        assert (await r.json())["error"]["code"] == "cors_origin_not_allowed"
        assert "Access-Control-Allow-Origin" not in r.headers and r.headers["Vary"] == "Origin"
    assert upstream.seen == []


async def test_actual_requests_get_cors_headers_only_for_allowed_origins(sidecar_factory, upstream, client):
    from aiohttp import web

    async def service(request, seen):
        # A service with its own (too generous) CORS headers: the sidecar's win.
        return web.Response(text="ok", headers={"Access-Control-Allow-Origin": "*", "Vary": "Accept-Encoding",
                                                "X-Total": "3"})

    upstream.responder = service
    sc = await sidecar_factory({}, cors_config(upstream.url, STRICT))
    url = f"{inbound_url(sc)}/api/orders"
    async with client.get(url, headers={"Origin": APP}) as r:
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == APP
        assert r.headers["Access-Control-Allow-Credentials"] == "true"
        assert r.headers["Access-Control-Expose-Headers"] == "X-Total"
        assert r.headers["Vary"] == "Accept-Encoding, Origin"
    async with client.get(url, headers={"Origin": "https://evil.example"}) as r:
        assert r.status == 200   # passed on; the browser keeps it from the page
        assert not [k for k in r.headers if k.lower().startswith("access-control-")]
        assert r.headers["Vary"] == "Accept-Encoding, Origin"
    async with client.get(url) as r:   # not a CORS request
        assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
    # A non-preflight OPTIONS (no Access-Control-Request-Method) reaches the service.
    async with client.options(url, headers={"Origin": APP}) as r:
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == APP
    assert [s.method for s in upstream.seen] == ["GET", "GET", "GET", "OPTIONS"]
    assert upstream.seen[0].headers["Origin"] == APP


async def test_the_sidecars_own_errors_carry_cors_headers(sidecar_factory, upstream, client):
    """A page must be able to read the 401 of an expired token: cors runs outside jwt."""
    sc = await sidecar_factory({}, cors_config(upstream.url, STRICT, """
        [inbound.routes."/api".jwt]
        secret = "not-used-here-0123456789abcdef0123"
        """))
    url = f"{inbound_url(sc)}/api/orders"
    async with client.options(url, headers={"Origin": APP, "Access-Control-Request-Method": "GET"}) as r:
        assert r.status == 204   # no token on a preflight, and none needed
    async with client.get(url, headers={"Origin": APP}) as r:
        assert r.status == 401 and r.headers["X-Sidecar-Error"] == "token_invalid"
        assert r.headers["Access-Control-Allow-Origin"] == APP and r.headers["Vary"] == "Origin"
    assert upstream.seen == []


async def test_any_origin_without_credentials(sidecar_factory, upstream, client):
    sc = await sidecar_factory({}, cors_config(upstream.url, 'allow_origins = ["*"]'))
    url = f"{inbound_url(sc)}/api/x"
    async with client.options(url, headers={"Origin": "https://a.example",
                                            "Access-Control-Request-Method": "GET"}) as r:
        assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in r.headers and "Vary" not in r.headers
        assert "Access-Control-Max-Age" not in r.headers
    async with client.get(url, headers={"Origin": "https://b.example"}) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "*" and "Vary" not in r.headers


async def test_vary_origin_is_added_to_every_vary_the_service_sent(sidecar_factory, upstream, client):
    """A service may send Vary on several lines (RFC 9110 5.3: one list), or
    name a header that merely contains "origin": none of its Vary values may be
    lost, and Origin is still added (a shared cache must not hand one origin's
    answer to another, nor one language's to another)."""
    from aiohttp import web
    from multidict import CIMultiDict

    async def service(request, seen):
        h = CIMultiDict([("Vary", "Accept-Encoding"), ("Vary", "Accept-Language")])
        if request.path.endswith("/hint"):
            h = CIMultiDict([("Vary", "X-Origin-Hint")])
        return web.Response(text="ok", headers=h)

    upstream.responder = service
    sc = await sidecar_factory({}, cors_config(upstream.url, STRICT))
    async with client.get(f"{inbound_url(sc)}/api/orders", headers={"Origin": APP}) as r:
        tokens = [t.strip().lower() for v in r.headers.getall("Vary") for t in v.split(",")]
        assert sorted(tokens) == ["accept-encoding", "accept-language", "origin"], r.headers.getall("Vary")
    async with client.get(f"{inbound_url(sc)}/api/hint", headers={"Origin": APP}) as r:
        tokens = [t.strip().lower() for v in r.headers.getall("Vary") for t in v.split(",")]
        assert sorted(tokens) == ["origin", "x-origin-hint"], r.headers.getall("Vary")
