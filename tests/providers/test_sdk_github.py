"""PyGithub through the sidecar: only base_url changed, a dummy token."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web
from github import Auth, Github, GithubException

REAL_TOKEN = "ghp_real0123456789"


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", REAL_TOKEN)


def quota(remaining: int) -> dict[str, str]:
    return {"x-ratelimit-limit": "5000", "x-ratelimit-remaining": str(remaining),
            "x-ratelimit-reset": str(int(time.time()) + 600), "x-github-request-id": "GH:1"}


def client(sc) -> Github:
    return Github(auth=Auth.Token("dummy"), base_url=f"{sc.url}/github", retry=None, lazy=False)


async def test_get_repo(env, provider, behind_sidecar):
    @provider.route("GET", "/repos/octo/hello")
    async def get_repo(request, seen):
        return web.json_response({"id": 1, "name": "hello", "full_name": "octo/hello", "private": False,
                                  "stargazers_count": 42, "url": f"{request.url}"}, headers=quota(4999))

    sc = await behind_sidecar("github")
    repo = await asyncio.to_thread(lambda: client(sc).get_repo("octo/hello"))
    assert repo.full_name == "octo/hello" and repo.stargazers_count == 42
    (seen,) = provider.seen
    assert seen.headers["Authorization"] == f"Bearer {REAL_TOKEN}"


async def test_rate_limit_as_the_sdk_shows_it(env, provider, behind_sidecar):
    @provider.route("GET", "/repos/octo/hello")
    async def repo(request, seen):
        return web.json_response({"message": "API rate limit exceeded for user ID 1.",
                                  "documentation_url": "https://docs.github.com/rest/rate-limit"},
                                 status=429, headers={"Retry-After": "60", **quota(0)})

    sc = await behind_sidecar("github")
    with pytest.raises(GithubException) as e:
        await asyncio.to_thread(lambda: client(sc).get_repo("octo/hello"))
    assert e.value.status == 429 and e.value.headers["retry-after"] == "60"
    assert "rate limit exceeded" in e.value.data["message"]
    # x-ratelimit-remaining: 0 until the reset: the next call stops at the sidecar.
    with pytest.raises(GithubException) as e2:
        await asyncio.to_thread(lambda: client(sc).get_repo("octo/hello"))
    assert e2.value.status == 429 and e2.value.headers["x-sidecar-error"] == "upstream_quota_exhausted"
    assert len(provider.seen) == 1
