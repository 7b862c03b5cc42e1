"""Fixtures for the SDK end-to-end tests: a fake provider behind a sidecar
running the shipped policy (policies/<name>.toml) with only its upstream
pointed at the fake."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from yarl import URL

from tests.support.sidecar import REPO, RunningSidecar
from tests.support.upstream import FakeUpstream, Seen

Route = Callable[[web.Request, Seen], Awaitable[web.StreamResponse]]


def shipped_policy(name: str, fake_url: str) -> str:
    """policies/<name>.toml with its upstream's scheme and host replaced by the
    fake's (the path prefix is kept); the [webhook] table, which needs an
    inbound listener, is left out (webhooks have their own tests)."""
    text = (REPO / "policies" / f"{name}.toml").read_text()
    text = text.split("\n[webhook]")[0]
    m = re.search(r'^upstream = "([^"]+)"$', text, flags=re.M)
    assert m, name
    path = URL(m.group(1)).path.rstrip("/")
    return text[:m.start()] + f'upstream = "{fake_url}{path}"' + text[m.end():]


class Provider:
    """A fake provider: ``routes[(METHOD, path)]`` answer; everything is recorded."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.up = FakeUpstream(self._dispatch)

    @property
    def seen(self) -> list[Seen]:
        return self.up.seen

    def route(self, method: str, path: str) -> Callable[[Route], Route]:
        def deco(fn: Route) -> Route:
            self.routes[(method, path)] = fn
            return fn
        return deco

    async def _dispatch(self, request: web.Request, seen: Seen) -> web.StreamResponse:
        fn = self.routes.get((request.method, request.path))
        if fn is None:
            return web.json_response({"error": f"fake has no {request.method} {request.path}"}, status=404)
        return await fn(request, seen)


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    p = Provider()
    await p.up.start()
    yield p
    await p.up.stop()


@pytest.fixture
def behind_sidecar(sidecar_factory, provider: Provider):
    """``await behind_sidecar("openai")``: a sidecar running the shipped policy
    against ``provider``."""
    async def start(name: str, config: str = "") -> RunningSidecar:
        return await sidecar_factory({name: shipped_policy(name, provider.up.url)}, config)
    return start
