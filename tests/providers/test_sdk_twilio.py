"""The official twilio helper library through the sidecar: only the API domain's
base URL changed, a dummy auth token."""

from __future__ import annotations

import asyncio
import base64
from urllib.parse import parse_qsl

import pytest
from aiohttp import web
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client

SID = "AC0123456789abcdef0123456789abcdef"
REAL_TOKEN = "real-auth-token-0123456789"
PATH = f"/2010-04-01/Accounts/{SID}/Messages.json"


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", SID)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", REAL_TOKEN)


def client(sc) -> Client:
    # The account SID is in every URL (it is no secret); the auth token is the sidecar's.
    c = Client(SID, "dummy-token")
    c.api.base_url = f"{sc.url}/twilio"
    return c


async def test_send_sms(env, provider, behind_sidecar):
    @provider.route("POST", PATH)
    async def messages(request, seen):
        form = dict(parse_qsl(seen.body.decode()))
        return web.json_response({"sid": "SM1", "account_sid": SID, "to": form["To"], "from": form["From"],
                                  "body": form["Body"], "status": "queued", "num_segments": "1"}, status=201)

    sc = await behind_sidecar("twilio")
    msg = await asyncio.to_thread(lambda: client(sc).messages.create(to="+15550001111", from_="+15550002222",
                                                                      body="hello"))
    assert msg.sid == "SM1" and msg.status == "queued" and msg.body == "hello"
    (seen,) = provider.seen
    assert seen.headers["Authorization"] == "Basic " + base64.b64encode(f"{SID}:{REAL_TOKEN}".encode()).decode()


async def test_too_many_requests_as_the_sdk_shows_it(env, provider, behind_sidecar):
    @provider.route("POST", PATH)
    async def messages(request, seen):
        return web.json_response({"code": 20429, "message": "Too Many Requests",
                                  "more_info": "https://www.twilio.com/docs/errors/20429", "status": 429},
                                 status=429, headers={"Retry-After": "10"})

    sc = await behind_sidecar("twilio")
    with pytest.raises(TwilioRestException) as e:
        await asyncio.to_thread(lambda: client(sc).messages.create(to="+15550001111", from_="+15550002222",
                                                                    body="hello"))
    assert e.value.status == 429 and e.value.code == 20429 and "Too Many Requests" in e.value.msg
    # Retry-After: 10 pauses the route (preset retry_after); the next call is the sidecar's 429.
    with pytest.raises(TwilioRestException) as e2:
        await asyncio.to_thread(lambda: client(sc).messages.create(to="+15550001111", from_="+15550002222",
                                                                    body="again"))
    assert e2.value.status == 429
    assert len(provider.seen) == 1
