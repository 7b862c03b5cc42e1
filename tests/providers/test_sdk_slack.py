"""The official slack_sdk through the sidecar: only base_url changed, a dummy token."""

from __future__ import annotations

import orjson
import pytest
from aiohttp import web
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

REAL_TOKEN = "xoxb-real-0123456789"


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", REAL_TOKEN)


def client(sc) -> AsyncWebClient:
    return AsyncWebClient(token="xoxb-dummy", base_url=f"{sc.url}/slack/", retry_handlers=[])


async def test_post_message(env, provider, behind_sidecar):
    @provider.route("POST", "/api/chat.postMessage")
    async def post(request, seen):
        body = orjson.loads(seen.body) if seen.body.startswith(b"{") else dict(await request.post())
        return web.json_response({"ok": True, "channel": body["channel"], "ts": "1700000000.000100",
                                  "message": {"type": "message", "text": body["text"]}})

    sc = await behind_sidecar("slack")
    got = await client(sc).chat_postMessage(channel="C123", text="hello")
    assert got["ok"] is True and got["message"]["text"] == "hello" and got["channel"] == "C123"
    (seen,) = provider.seen
    assert seen.headers["Authorization"] == f"Bearer {REAL_TOKEN}"


async def test_ratelimited_as_the_sdk_shows_it(env, provider, behind_sidecar):
    @provider.route("GET", "/api/conversations.history")
    async def history(request, seen):
        return web.json_response({"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": "30"})

    sc = await behind_sidecar("slack")
    with pytest.raises(SlackApiError) as e:
        await client(sc).conversations_history(channel="C123")
    assert e.value.response.status_code == 429
    assert e.value.response.headers["Retry-After"] == "30"
    assert e.value.response["error"] == "ratelimited"
    assert provider.seen[0].headers["Authorization"] == f"Bearer {REAL_TOKEN}"
