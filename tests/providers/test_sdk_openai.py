"""The official openai SDK through the sidecar: only base_url changed, a dummy key."""

from __future__ import annotations

import asyncio
import time

import openai
import orjson
import pytest
from aiohttp import web


REAL_KEY = "sk-real-0123456789"


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", REAL_KEY)
    monkeypatch.setenv("OPENAI_PROJECT", "proj_42")
    monkeypatch.delenv("OPENAI_ORG", raising=False)


def completion(text: str) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()), "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


QUOTA = {"x-ratelimit-remaining-requests": "499", "x-ratelimit-reset-requests": "120ms",
         "x-ratelimit-remaining-tokens": "149000", "x-ratelimit-reset-tokens": "6m0s"}


def client(sc) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key="sk-dummy", base_url=f"{sc.url}/openai/v1", max_retries=0)


async def test_chat_completion(env, provider, behind_sidecar):
    @provider.route("POST", "/v1/chat/completions")
    async def chat(request, seen):
        return web.json_response(completion("hello from the fake"), headers={"x-request-id": "req_abc", **QUOTA})

    sc = await behind_sidecar("openai")
    async with client(sc) as oa:
        got = await oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert got.choices[0].message.content == "hello from the fake"
    assert got._request_id == "req_abc"            # the provider's id, not the sidecar's
    (seen,) = provider.seen
    assert seen.headers["Authorization"] == f"Bearer {REAL_KEY}"
    assert seen.headers["OpenAI-Project"] == "proj_42"
    assert "OpenAI-Organization" not in seen.headers     # optional and unset
    assert orjson.loads(seen.body)["messages"] == [{"role": "user", "content": "hi"}]


async def test_streaming_arrives_chunk_by_chunk(env, provider, behind_sidecar):
    words = ["Hel", "lo", ", ", "wor", "ld"]
    sent: list[float] = []

    @provider.route("POST", "/v1/chat/completions")
    async def chat(request, seen):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **QUOTA})
        await resp.prepare(request)
        for w in words:
            chunk = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
                     "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            sent.append(time.monotonic())
            await asyncio.sleep(0.15)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    sc = await behind_sidecar("openai")
    got: list[tuple[str, float]] = []
    async with client(sc) as oa:
        stream = await oa.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                  messages=[{"role": "user", "content": "hi"}])
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got.append((chunk.choices[0].delta.content, time.monotonic()))
    assert "".join(w for w, _ in got) == "Hello, world"
    # The first word reached the SDK before the fake had written the last one.
    assert got[0][1] < sent[-1]
    assert provider.seen[0].headers["Authorization"] == f"Bearer {REAL_KEY}"


async def test_rate_limit_error_as_the_sdk_shows_it(env, provider, behind_sidecar):
    @provider.route("POST", "/v1/chat/completions")
    async def chat(request, seen):
        return web.json_response(
            {"error": {"message": "Rate limit reached for gpt-4o-mini on requests per min (RPM)",
                       "type": "requests", "param": None, "code": "rate_limit_exceeded"}},
            status=429, headers={"Retry-After": "20", "x-request-id": "req_429"})

    sc = await behind_sidecar("openai")
    async with client(sc) as oa:
        with pytest.raises(openai.RateLimitError) as e:
            await oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 429
        assert e.value.response.headers["retry-after"] == "20"
        assert e.value.code == "rate_limit_exceeded" and "Rate limit reached" in e.value.message
        assert e.value.request_id == "req_429"
        # The provider said to wait 20 s: the next call stops at the sidecar,
        # and the SDK shows the sidecar's message (its error body has the shape the SDK reads).
        with pytest.raises(openai.RateLimitError) as e2:
            await oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "again"}])
    assert e2.value.response.headers["X-Sidecar-Error"] == "upstream_quota_exhausted"
    assert e2.value.code == "upstream_quota_exhausted" and "quota" in e2.value.message
    # on_limit = "queue" with max_wait 10s: a 20 s block is refused at once.
    assert 18 <= int(e2.value.response.headers["retry-after"]) <= 20
    assert len(provider.seen) == 1


async def test_secret_unavailable_is_readable_in_the_sdk(provider, behind_sidecar, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    sc = await behind_sidecar("openai")
    async with client(sc) as oa:
        with pytest.raises(openai.InternalServerError) as e:
            await oa.models.list()
    assert e.value.status_code == 503 and e.value.code == "secret_unavailable"
    assert "OPENAI_API_KEY" in e.value.message
    assert provider.seen == []
