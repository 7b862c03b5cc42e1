"""auth type = "oauth2_jwt_bearer" (RFC 7523, Google service accounts): the
assertion is checked with google-auth's own JWT verifier at a fake token endpoint."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import jwt as google_jwt

from plugins.auth.config import Config
from tests.support.upstream import FakeUpstream, serve

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PRIVATE_PEM = KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
PUBLIC_PEM = KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
EMAIL = "sidecar@project-1.iam.gserviceaccount.com"
SCOPES = ["https://www.googleapis.com/auth/spreadsheets", "https://www.googleapis.com/auth/calendar"]


def service_account(token_uri: str, **over: str) -> str:
    data = {"type": "service_account", "project_id": "project-1", "private_key_id": "kid-1",
            "private_key": PRIVATE_PEM, "client_email": EMAIL, "client_id": "1234",
            "token_uri": token_uri, **over}
    return json.dumps(data)


class GoogleTokenEndpoint:
    """oauth2.googleapis.com/token as far as the JWT bearer grant goes."""

    def __init__(self) -> None:
        self.claims: list[dict] = []
        self.issued: list[str] = []
        self.refuse = False
        self.port = 0
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    async def _token(self, request: web.Request) -> web.Response:
        form = dict(parse_qsl((await request.read()).decode()))
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" or self.refuse:
            return web.json_response({"error": "invalid_grant"}, status=400)
        # google-auth's verifier: signature by the key named in kid, exp/iat, audience.
        claims = google_jwt.decode(form["assertion"], certs={"kid-1": PUBLIC_PEM},
                                   audience=str(request.url.with_query(None)))
        self.claims.append(claims)
        tok = f"ya29.token-{len(self.issued) + 1}"
        self.issued.append(tok)
        return web.json_response({"access_token": tok, "expires_in": 3599, "token_type": "Bearer"})

    async def start(self) -> "GoogleTokenEndpoint":
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post("/other/token", self._token)
        self.runner, self.port = await serve(app)
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def google():
    g = await GoogleTokenEndpoint().start()
    yield g
    await g.stop()


def policy(up: str, credentials: str = "env:GOOGLE_SA", extra: str = "") -> str:
    scopes = ", ".join(f'"{s}"' for s in SCOPES)
    return f'''route = "/sheets"
upstream = "{up}"
[auth]
type = "oauth2_jwt_bearer"
credentials = "{credentials}"
scopes = [{scopes}]
{extra}
'''


async def test_assertion_exchanged_cached_and_injected(sidecar_factory, upstream, client, google, monkeypatch):
    monkeypatch.setenv("GOOGLE_SA", service_account(google.url))
    sc = await sidecar_factory({"sheets": policy(upstream.url)})
    for _ in range(3):
        async with client.get(f"{sc.url}/sheets/v4/spreadsheets/abc", headers={"Authorization": "Bearer dummy"}) as r:
            assert r.status == 200
    assert [s.headers["Authorization"] for s in upstream.seen] == ["Bearer ya29.token-1"] * 3
    (claims,) = google.claims
    assert claims["iss"] == EMAIL and claims["aud"] == google.url
    assert claims["scope"] == " ".join(SCOPES) and "sub" not in claims
    assert claims["exp"] - claims["iat"] == 3600
    async with client.get(f"{sc.admin}/admin/secrets") as r:
        text = await r.text()
    assert "PRIVATE KEY" not in text


async def test_file_credentials_subject_and_token_url(sidecar_factory, upstream, client, google, tmp_path):
    sa = tmp_path / "sa.json"
    sa.write_text(service_account("https://oauth2.googleapis.com/token"))
    extra = f'token_url = "http://127.0.0.1:{google.port}/other/token"\nsubject = "admin@example.com"'
    sc = await sidecar_factory({"sheets": policy(upstream.url, f"file:{sa}", extra)})
    async with client.get(f"{sc.url}/sheets/v4/x") as r:
        assert r.status == 200
    (claims,) = google.claims
    # token_url wins over the JSON's token_uri, and is the audience.
    assert claims["aud"] == f"http://127.0.0.1:{google.port}/other/token"
    assert claims["sub"] == "admin@example.com"
    assert upstream.seen[0].headers["Authorization"] == "Bearer ya29.token-1"


async def test_401_renews_the_token_once(sidecar_factory, client, google, monkeypatch):
    calls = []

    async def flaky(request: web.Request, seen) -> web.Response:
        calls.append(seen.headers["Authorization"])
        return web.json_response({}, status=401 if len(calls) == 1 else 200)

    up = await FakeUpstream(flaky).start()
    try:
        monkeypatch.setenv("GOOGLE_SA", service_account(google.url))
        sc = await sidecar_factory({"sheets": policy(up.url)})
        async with client.post(f"{sc.url}/sheets/v4/x", data=b'{"values": []}') as r:
            assert r.status == 200
        assert calls == ["Bearer ya29.token-1", "Bearer ya29.token-2"]
        assert len(google.claims) == 2
    finally:
        await up.stop()


async def test_unset_credentials_are_503_secret_unavailable(sidecar_factory, upstream, client, monkeypatch):
    monkeypatch.delenv("GOOGLE_SA", raising=False)
    sc = await sidecar_factory({"sheets": policy(upstream.url)})
    async with client.get(f"{sc.url}/sheets/v4/x") as r:
        assert r.status == 503 and r.headers["X-Sidecar-Error"] == "secret_unavailable"
    assert upstream.seen == []


@pytest.mark.parametrize("value, reason", [
    ("not json", "is not JSON"),
    (json.dumps({"client_email": EMAIL}), "has no private_key"),
    (json.dumps({"client_email": EMAIL, "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"}),
     "not an unencrypted PEM key"),
    (json.dumps({"client_email": EMAIL, "private_key": PRIVATE_PEM}), "no token_uri"),
])
async def test_unusable_credentials_are_503_without_the_key(sidecar_factory, upstream, client, monkeypatch,
                                                           value, reason):
    monkeypatch.setenv("GOOGLE_SA", value)
    sc = await sidecar_factory({"sheets": policy(upstream.url)})
    async with client.get(f"{sc.url}/sheets/v4/x") as r:
        assert r.status == 503 and r.headers["X-Sidecar-Error"] == "oauth2_token_unavailable"
        body = await r.text()
    assert reason in body and "PRIVATE KEY" not in body and "AAAA" not in body
    assert upstream.seen == []


async def test_refused_grant_is_503(sidecar_factory, upstream, client, google, monkeypatch):
    google.refuse = True
    monkeypatch.setenv("GOOGLE_SA", service_account(google.url))
    sc = await sidecar_factory({"sheets": policy(upstream.url)})
    async with client.get(f"{sc.url}/sheets/v4/x") as r:
        assert r.status == 503 and r.headers["X-Sidecar-Error"] == "oauth2_token_unavailable"
    assert upstream.seen == []


@pytest.mark.parametrize("table, message", [
    ({"type": "oauth2_jwt_bearer"}, "needs credentials"),
    ({"type": "oauth2_jwt_bearer", "credentials": "env:X", "token_url": "ftp://x"}, "token_url"),
    ({"type": "bearer", "secret": "env:X", "credentials": "env:Y"}, "oauth2_jwt_bearer"),
    ({"type": "bearer", "secret": "env:X", "subject": "a@b"}, "oauth2_jwt_bearer"),
    ({"type": "oauth2_jwt_bearer", "credentials": "env:X", "client_auth": "body", "audience": "x"},
     "oauth2_client_credentials"),
])
def test_config(table, message):
    with pytest.raises(ValueError, match=message):
        Config.model_validate(table)


def test_config_accepts_scopes_and_token_url():
    c = Config.model_validate({"type": "oauth2_jwt_bearer", "credentials": "vault:gcp/sa#json",
                               "scopes": SCOPES, "token_url": "https://oauth2.googleapis.com/token"})
    assert c.scopes == SCOPES


async def test_literal_credentials_are_refused(sidecar_factory, upstream, tmp_path):
    from proxy.errors import ConfigError

    with pytest.raises(ConfigError, match="must be a secret reference"):
        await sidecar_factory({"sheets": policy(upstream.url, credentials="{not a ref}")})

