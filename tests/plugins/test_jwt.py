"""jwt on an inbound route: HS256 with a secret reference, RS256/ES256 from a JWKS server."""

from __future__ import annotations

import time

import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from plugins.jwt import Config
from tests.support.inbound import inbound_config, inbound_url
from tests.support.upstream import FakeUpstream

SECRET = "jwt-test-secret-0123456789-abcdefghij"


def hs_route(extra: str = "") -> str:
    return f"""
        [inbound.routes."/api".jwt]
        secret = "env:JWT_SECRET"
        issuer = "https://id.example"
        audience = "orders"
        leeway = "30s"
        {extra}
        """


def claims(**over: object) -> dict:
    now = int(time.time())
    base = {"sub": "user-1", "iss": "https://id.example", "aud": "orders", "iat": now, "exp": now + 60}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


async def get(client, url: str, token: str | None, **headers: str):
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with client.get(url, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


@pytest.fixture
async def hs(monkeypatch, sidecar_factory, upstream):
    monkeypatch.setenv("JWT_SECRET", SECRET)
    sc = await sidecar_factory({}, inbound_config(upstream.url, extra=hs_route()))
    return inbound_url(sc)


async def test_valid_hs256_token_passes_with_the_same_path(hs, client, upstream):
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    status, _, _ = await get(client, f"{hs}/api/orders/7?x=1", token)
    assert status == 200
    assert upstream.seen[0].path_qs == "/api/orders/7?x=1"
    assert upstream.seen[0].headers["Authorization"] == f"Bearer {token}"


@pytest.mark.parametrize("token", [
    None,
    "not-a-jwt",
    jwt.encode(claims(), "another-secret-another-secret-xx", algorithm="HS256"),
    jwt.encode(claims(exp=int(time.time()) - 120), SECRET, algorithm="HS256"),
    jwt.encode(claims(aud="billing"), SECRET, algorithm="HS256"),
    jwt.encode(claims(iss="https://evil.example"), SECRET, algorithm="HS256"),
    jwt.encode(claims(exp=None), SECRET, algorithm="HS256"),
    jwt.encode(claims(), None, algorithm="none"),
], ids=["missing", "garbage", "wrong-secret", "expired", "audience", "issuer", "no-exp", "alg-none"])
async def test_bad_tokens_get_401_token_invalid(hs, client, upstream, token):
    status, headers, body = await get(client, f"{hs}/api/orders", token)
    assert status == 401
    assert headers["X-Sidecar-Error"] == "token_invalid"
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert SECRET.encode() not in body
    assert upstream.seen == []


async def test_leeway_admits_a_token_just_expired(hs, client, upstream):
    token = jwt.encode(claims(exp=int(time.time()) - 10), SECRET, algorithm="HS256")
    assert (await get(client, f"{hs}/api", token))[0] == 200


async def test_paths_outside_routes_are_404(hs, client, upstream):
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    status, headers, _ = await get(client, f"{hs}/apix", token)
    assert status == 404 and headers["X-Sidecar-Error"] == "no_route"


# ---- JWKS ------------------------------------------------------------------------

def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(private, kid: str, alg: str) -> dict:
    algo = jwt.algorithms.RSAAlgorithm if alg.startswith("RS") else jwt.algorithms.ECAlgorithm
    out = algo.to_jwk(private.public_key(), as_dict=True)
    out.update(kid=kid, alg=alg, use="sig")
    return out


async def test_jwks_rs256_and_es256_cached_and_rotated(sidecar_factory, upstream, client):
    rsa1, ec1, rsa2 = rsa_key(), ec.generate_private_key(ec.SECP256R1()), rsa_key()
    keyset = {"keys": [jwk(rsa1, "r1", "RS256"), jwk(ec1, "e1", "ES256")]}

    async def jwks(request, seen):
        return web.json_response(keyset)

    idp = await FakeUpstream(jwks).start()
    try:
        sc = await sidecar_factory({}, inbound_config(upstream.url, extra=f"""
            [inbound.routes."/api".jwt]
            jwks_url = "{idp.url}/.well-known/jwks.json"
            audience = "orders"
            """))
        url = inbound_url(sc)
        t_rs = jwt.encode(claims(), rsa1, algorithm="RS256", headers={"kid": "r1"})
        t_es = jwt.encode(claims(), ec1, algorithm="ES256", headers={"kid": "e1"})
        for t in (t_rs, t_es, t_rs):
            assert (await get(client, f"{url}/api/x", t))[0] == 200
        assert len(idp.seen) == 1  # cached
        # Algorithm confusion: an HS256 token keyed with the public key is refused.
        pem = rsa1.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        import hashlib
        import hmac as _hmac
        import base64
        import json

        def b64(b: bytes) -> bytes:
            return base64.urlsafe_b64encode(b).rstrip(b"=")

        head = b64(json.dumps({"alg": "HS256", "kid": "r1", "typ": "JWT"}).encode())
        body = b64(json.dumps(claims()).encode())
        sig = b64(_hmac.new(pem, head + b"." + body, hashlib.sha256).digest())
        forged = (head + b"." + body + b"." + sig).decode()
        assert (await get(client, f"{url}/api/x", forged))[0] == 401
        # Rotation: a token with a new kid makes the sidecar fetch the set again.
        keyset["keys"].append(jwk(rsa2, "r2", "RS256"))
        t_new = jwt.encode(claims(), rsa2, algorithm="RS256", headers={"kid": "r2"})
        assert (await get(client, f"{url}/api/x", t_new))[0] == 200
        assert len(idp.seen) == 2
        t_unknown = jwt.encode(claims(), rsa_key(), algorithm="RS256", headers={"kid": "zz"})
        status, headers, _ = await get(client, f"{url}/api/x", t_unknown)
        assert status == 401 and headers["X-Sidecar-Error"] == "token_invalid"
    finally:
        await idp.stop()


async def test_failing_jwks_refresh_backs_off_and_keeps_cached_keys(sidecar_factory, upstream, client):
    """Once the cached set is past its TTL and the identity provider fails,
    requests keep using the cached keys without each one refetching (serially,
    under the lock, with a 5 s timeout each) until the next backoff ends."""
    import asyncio

    rsa1 = rsa_key()
    state = {"up": True}

    async def jwks(request, seen):
        if state["up"]:
            return web.json_response({"keys": [jwk(rsa1, "r1", "RS256")]})
        return web.Response(status=500)

    idp = await FakeUpstream(jwks).start()
    try:
        sc = await sidecar_factory({}, inbound_config(upstream.url, extra=f"""
            [inbound.routes."/api".jwt]
            jwks_url = "{idp.url}/jwks"
            jwks_cache_ttl = "0.2s"
            """))
        url = inbound_url(sc)
        token = jwt.encode(claims(), rsa1, algorithm="RS256", headers={"kid": "r1"})
        assert (await get(client, f"{url}/api/x", token))[0] == 200
        state["up"] = False
        await asyncio.sleep(0.3)  # past the TTL: the next request refreshes
        results = await asyncio.gather(*(get(client, f"{url}/api/x", token) for _ in range(8)))
        assert [r[0] for r in results] == [200] * 8
        assert len(idp.seen) == 2, len(idp.seen)  # the first fetch and one failed refresh
    finally:
        await idp.stop()


async def test_jwks_unreachable_is_503(sidecar_factory, upstream, client):
    from tests.support.sidecar import free_port

    sc = await sidecar_factory({}, inbound_config(upstream.url, extra=f"""
        [inbound.routes."/api".jwt]
        jwks_url = "http://127.0.0.1:{free_port()}/jwks"
        """))
    token = jwt.encode(claims(), rsa_key(), algorithm="RS256", headers={"kid": "r1"})
    status, headers, _ = await get(client, f"{inbound_url(sc)}/api", token)
    assert status == 503 and headers["X-Sidecar-Error"] == "auth_unavailable"
    assert upstream.seen == []


@pytest.mark.parametrize("table,fragment", [
    ({}, "exactly one"),
    ({"secret": "s", "jwks_url": "http://x"}, "exactly one"),
    ({"secret": "s", "algorithms": ["RS256"]}, "does not fit"),
    ({"jwks_url": "http://x", "algorithms": ["HS256"]}, "does not fit"),
    ({"jwks_url": "ftp://x"}, "jwks_url"),
])
def test_config_errors(table, fragment):
    with pytest.raises(ValueError) as e:
        Config(**table)
    assert fragment in str(e.value)


async def test_oversized_jwks_is_refused_like_an_unreachable_one(sidecar_factory, upstream, client):
    from aiohttp import web

    from tests.support.upstream import serve

    key = rsa_key()
    # A valid key set, padded past the 1 MiB bound: refused before it is parsed.
    body = orjson.dumps(jwk(key, "r1", "RS256"))

    async def huge(request):
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"keys": [' + body + b" " * (2 * 1024 * 1024) + b"]}")
        return resp
    app = web.Application()
    app.router.add_get("/jwks", huge)
    runner, port = await serve(app)
    try:
        sc = await sidecar_factory({}, inbound_config(upstream.url, extra=f"""
            [inbound.routes."/api".jwt]
            jwks_url = "http://127.0.0.1:{port}/jwks"
            """))
        token = jwt.encode(claims(), key, algorithm="RS256", headers={"kid": "r1"})
        status, headers, _ = await get(client, f"{inbound_url(sc)}/api", token)
        assert status == 503 and headers["X-Sidecar-Error"] == "auth_unavailable"
        assert upstream.seen == []
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("path", ["/%61pi/orders", "/api%2Forders", "/%61p%69/orders"])
async def test_a_percent_encoded_path_cannot_step_around_the_protected_prefix(
        monkeypatch, sidecar_factory, upstream, client, path):
    """`/%61pi/orders` is `/api/orders` to the service (its framework decodes
    the path before routing, RFC 3986 6.2.2.2), so the sidecar must not match
    it to a less protected enclosing route ("/" here) and forward it without
    a token."""
    monkeypatch.setenv("JWT_SECRET", SECRET)
    sc = await sidecar_factory({}, inbound_config(upstream.url, extra=hs_route() + """
        [inbound.routes."/".headers]
        request = { set = { "X-Via" = "sidecar" } }
        """))
    from yarl import URL

    status, _, body = await get(client, URL(inbound_url(sc) + path, encoded=True), None)   # sent as written
    from urllib.parse import unquote

    reached = [unquote(s.path_qs) for s in upstream.seen]   # as the service's framework routes it
    assert status != 200 and not [p for p in reached if p.startswith("/api")], (status, reached, body)


async def test_subject_is_hashed_in_the_access_log_with_hash_identifiers(monkeypatch, sidecar_factory, upstream,
                                                                         client):
    import hashlib
    import hmac

    monkeypatch.setenv("JWT_SECRET", SECRET)
    monkeypatch.setenv("TEST_LOG_HASH_KEY", "k3y-for-audit")
    sc = await sidecar_factory({}, inbound_config(upstream.url, extra=hs_route()),
                               logging='hash_identifiers = true\nhash_key = "env:TEST_LOG_HASH_KEY"')
    token = jwt.encode(claims(sub="alice@example.com"), SECRET, algorithm="HS256")
    status, _, _ = await get(client, f"{inbound_url(sc)}/api/orders", token)
    assert status == 200
    [line] = await sc.wait_access_lines(1)
    hashed = hmac.new(b"k3y-for-audit", b"alice@example.com", hashlib.sha256).hexdigest()[:16]
    assert line["decisions"]["jwt"] == {"sub": hashed}
    assert "alice" not in orjson.dumps(line).decode()
