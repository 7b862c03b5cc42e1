"""google-api-python-client through the sidecar: only api_endpoint changed, no
credentials in the service; the sidecar signs in with the service account
(oauth2_jwt_bearer) at a fake token endpoint and injects the access token."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import parse_qsl

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import jwt as google_jwt
from google.auth.credentials import AnonymousCredentials
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC_PEM = KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
EMAIL = "reports@project-1.iam.gserviceaccount.com"
SHEET = "1BxiMVs0XRA5nFMdKvBdBZjgmUUqptlbs74OgvE2upms"
VALUES = f"/v4/spreadsheets/{SHEET}/values/Sheet1!A1:B2"


@pytest.fixture
def google(provider, monkeypatch):
    pem = KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    monkeypatch.setenv("GOOGLE_SERVICE_ACCOUNT_JSON", json.dumps({
        "type": "service_account", "project_id": "project-1", "private_key_id": "k1", "private_key": pem,
        "client_email": EMAIL, "token_uri": f"{provider.up.url}/token"}))
    claims: list[dict] = []

    @provider.route("POST", "/token")
    async def token(request, seen):
        form = dict(parse_qsl(seen.body.decode()))
        claims.append(google_jwt.decode(form["assertion"], certs={"k1": PUBLIC_PEM},
                                        audience=f"{provider.up.url}/token"))
        return web.json_response({"access_token": "ya29.from-the-sidecar", "expires_in": 3599,
                                  "token_type": "Bearer"})
    return claims


def sheets(sc):
    return build("sheets", "v4", credentials=AnonymousCredentials(), static_discovery=True,
                 client_options={"api_endpoint": f"{sc.url}/google-sheets/"})


async def test_read_values(google, provider, behind_sidecar):
    @provider.route("GET", VALUES)
    async def values(request, seen):
        return web.json_response({"range": "Sheet1!A1:B2", "majorDimension": "ROWS",
                                  "values": [["name", "qty"], ["apples", "3"]]})

    sc = await behind_sidecar("google-sheets")
    got = await asyncio.to_thread(
        lambda: sheets(sc).spreadsheets().values().get(spreadsheetId=SHEET, range="Sheet1!A1:B2").execute())
    assert got["values"] == [["name", "qty"], ["apples", "3"]]
    (claims,) = google
    assert claims["iss"] == EMAIL and claims["scope"] == "https://www.googleapis.com/auth/spreadsheets"
    api = [s for s in provider.seen if s.path_qs.startswith("/v4/")]
    assert api[0].headers["Authorization"] == "Bearer ya29.from-the-sidecar"


async def test_rate_limit_as_the_sdk_shows_it(google, provider, behind_sidecar):
    @provider.route("GET", VALUES)
    async def values(request, seen):
        return web.json_response({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
                                            "message": "Quota exceeded for quota metric 'Read requests'"}},
                                 status=429, headers={"Retry-After": "30"})

    sc = await behind_sidecar("google-sheets")
    with pytest.raises(HttpError) as e:
        await asyncio.to_thread(
            lambda: sheets(sc).spreadsheets().values().get(spreadsheetId=SHEET, range="Sheet1!A1:B2")
            .execute(num_retries=0))
    assert e.value.resp.status == 429 and e.value.resp["retry-after"] == "30"
    assert "Quota exceeded" in e.value.reason
    api = [s for s in provider.seen if s.path_qs.startswith("/v4/")]
    assert len(api) == 1 and api[0].headers["Authorization"] == "Bearer ya29.from-the-sidecar"
