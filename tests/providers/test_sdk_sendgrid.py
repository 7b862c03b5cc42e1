"""The official sendgrid SDK through the sidecar: only the host changed, a dummy key."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiohttp import web
from python_http_client.exceptions import TooManyRequestsError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import Mail

REAL_KEY = "SG.real.0123456789"


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("SENDGRID_API_KEY", REAL_KEY)


def mail() -> Mail:
    return Mail(from_email="from@example.com", to_emails="to@example.com", subject="Hi",
                plain_text_content="Hello")


def client(sc) -> SendGridAPIClient:
    return SendGridAPIClient(api_key="SG.dummy", host=f"{sc.url}/sendgrid")


async def test_send_mail(env, provider, behind_sidecar):
    @provider.route("POST", "/v3/mail/send")
    async def send(request, seen):
        return web.Response(status=202, headers={"X-Message-Id": "msg-1"})

    sc = await behind_sidecar("sendgrid")
    resp = await asyncio.to_thread(lambda: client(sc).send(mail()))
    assert resp.status_code == 202 and resp.headers["X-Message-Id"] == "msg-1"
    (seen,) = provider.seen
    assert seen.headers["Authorization"] == f"Bearer {REAL_KEY}"
    sent = orjson.loads(seen.body)
    assert sent["personalizations"][0]["to"] == [{"email": "to@example.com"}] and sent["subject"] == "Hi"


async def test_too_many_requests_as_the_sdk_shows_it(env, provider, behind_sidecar):
    @provider.route("POST", "/v3/mail/send")
    async def send(request, seen):
        return web.json_response({"errors": [{"field": None, "message": "too many requests"}]}, status=429,
                                 headers={"Retry-After": "1", "X-RateLimit-Remaining": "0",
                                          "X-RateLimit-Limit": "600"})

    sc = await behind_sidecar("sendgrid")
    with pytest.raises(TooManyRequestsError) as e:
        await asyncio.to_thread(lambda: client(sc).send(mail()))
    assert e.value.status_code == 429 and e.value.headers["Retry-After"] == "1"
    assert e.value.to_dict["errors"][0]["message"] == "too many requests"
    assert provider.seen[0].headers["Authorization"] == f"Bearer {REAL_KEY}"
