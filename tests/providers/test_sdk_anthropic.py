"""The official anthropic SDK through the sidecar: only base_url changed, a dummy key."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone

import anthropic
import orjson
import pytest
from aiohttp import web

REAL_KEY = "sk-ant-real-0123456789"


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", REAL_KEY)


def quota(remaining: int = 49) -> dict[str, str]:
    reset = (datetime.now(timezone.utc) + timedelta(seconds=30)).isoformat().replace("+00:00", "Z")
    return {"anthropic-ratelimit-requests-remaining": str(remaining), "anthropic-ratelimit-requests-reset": reset,
            "request-id": "req_011anthropic"}


def message(text: str) -> dict:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-fake-1",
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 2}}


def client(sc) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key="sk-ant-dummy", base_url=f"{sc.url}/anthropic", max_retries=0)


async def test_message(env, provider, behind_sidecar):
    @provider.route("POST", "/v1/messages")
    async def messages(request, seen):
        return web.json_response(message("hello from the fake"), headers=quota())

    sc = await behind_sidecar("anthropic")
    async with client(sc) as an:
        got = await an.messages.create(model="claude-fake-1", max_tokens=16,
                                       messages=[{"role": "user", "content": "hi"}])
    assert got.content[0].text == "hello from the fake"
    assert got._request_id == "req_011anthropic"
    (seen,) = provider.seen
    assert seen.headers["x-api-key"] == REAL_KEY
    assert seen.headers["anthropic-version"]       # the SDK's own headers pass through
    assert orjson.loads(seen.body)["max_tokens"] == 16


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: ".encode() + orjson.dumps(data) + b"\n\n"


async def test_streaming(env, provider, behind_sidecar):
    words = ["Hel", "lo ", "there"]
    sent: list[float] = []

    @provider.route("POST", "/v1/messages")
    async def messages(request, seen):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **quota()})
        await resp.prepare(request)
        start = message("")
        start["content"], start["stop_reason"] = [], None
        await resp.write(sse("message_start", {"type": "message_start", "message": start}))
        await resp.write(sse("content_block_start", {"type": "content_block_start", "index": 0,
                                                     "content_block": {"type": "text", "text": ""}}))
        for w in words:
            await resp.write(sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                         "delta": {"type": "text_delta", "text": w}}))
            sent.append(time.monotonic())
            await asyncio.sleep(0.15)
        await resp.write(sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
        await resp.write(sse("message_delta", {"type": "message_delta",
                                               "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                               "usage": {"output_tokens": 3}}))
        await resp.write(sse("message_stop", {"type": "message_stop"}))
        await resp.write_eof()
        return resp

    sc = await behind_sidecar("anthropic")
    got: list[tuple[str, float]] = []
    async with client(sc) as an:
        async with an.messages.stream(model="claude-fake-1", max_tokens=16,
                                      messages=[{"role": "user", "content": "hi"}]) as stream:
            async for text in stream.text_stream:
                got.append((text, time.monotonic()))
            final = await stream.get_final_message()
    assert "".join(t for t, _ in got) == "Hello there"
    assert final.content[0].text == "Hello there" and final.stop_reason == "end_turn"
    assert got[0][1] < sent[-1]
    assert provider.seen[0].headers["x-api-key"] == REAL_KEY


async def test_rate_limit_error_as_the_sdk_shows_it(env, provider, behind_sidecar):
    @provider.route("POST", "/v1/messages")
    async def messages(request, seen):
        return web.json_response(
            {"type": "error", "error": {"type": "rate_limit_error",
                                        "message": "Number of requests has exceeded your per-minute rate limit"}},
            status=429, headers={"retry-after": "30", **quota(0)})

    sc = await behind_sidecar("anthropic")
    async with client(sc) as an:
        with pytest.raises(anthropic.RateLimitError) as e:
            await an.messages.create(model="claude-fake-1", max_tokens=16,
                                     messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "30"
        assert e.value.body["error"]["type"] == "rate_limit_error"
        with pytest.raises(anthropic.RateLimitError) as e2:
            await an.messages.create(model="claude-fake-1", max_tokens=16,
                                     messages=[{"role": "user", "content": "hi"}])
    # The sidecar's own 429 reads like Anthropic's: {"type": "error", "error": {"type": ...}}.
    assert e2.value.body["type"] == "error"
    assert e2.value.body["error"]["type"] == "upstream_quota_exhausted"
    assert "quota" in str(e2.value)
    assert len(provider.seen) == 1
