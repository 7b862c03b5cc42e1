"""notion-client through the sidecar: only base_url changed, a dummy token."""

from __future__ import annotations

import pytest
from aiohttp import web
from notion_client import APIErrorCode, APIResponseError, AsyncClient
from notion_client.errors import HTTPResponseError

REAL_TOKEN = "ntn_real0123456789"


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("NOTION_TOKEN", REAL_TOKEN)


def client(sc) -> AsyncClient:
    return AsyncClient(auth="dummy", base_url=f"{sc.url}/notion", retry=False)


async def test_retrieve_page(env, provider, behind_sidecar):
    @provider.route("GET", "/v1/pages/59833787-2cf9-4fdf-8782-e53db20768a5")
    async def page(request, seen):
        return web.json_response({"object": "page", "id": "59833787-2cf9-4fdf-8782-e53db20768a5",
                                  "properties": {"title": {"id": "title", "type": "title", "title": []}}})

    sc = await behind_sidecar("notion")
    async with client(sc) as notion:
        got = await notion.pages.retrieve(page_id="59833787-2cf9-4fdf-8782-e53db20768a5")
    assert got["object"] == "page" and "title" in got["properties"]
    (seen,) = provider.seen
    assert seen.headers["Authorization"] == f"Bearer {REAL_TOKEN}"
    assert seen.headers["Notion-Version"]          # the SDK's choice of API version passes through


async def test_rate_limited_as_the_sdk_shows_it(env, provider, behind_sidecar):
    @provider.route("POST", "/v1/search")
    async def search(request, seen):
        return web.json_response({"object": "error", "status": 429, "code": "rate_limited",
                                  "message": "You have been rate limited. Please try again in a few minutes."},
                                 status=429, headers={"Retry-After": "15"})

    sc = await behind_sidecar("notion")
    async with client(sc) as notion:
        with pytest.raises(APIResponseError) as e:
            await notion.search(query="x")
        assert e.value.code == APIErrorCode.RateLimited and e.value.status == 429
        assert e.value.headers["retry-after"] == "15"
        # Retry-After: 15 s; the next call is the sidecar's 429, not Notion's
        # (its JSON error is not Notion's shape, so the SDK names it an HTTP error).
        with pytest.raises(HTTPResponseError) as e2:
            await notion.search(query="x")
    assert e2.value.status == 429 and e2.value.headers["x-sidecar-error"] == "upstream_quota_exhausted"
    assert len(provider.seen) == 1
