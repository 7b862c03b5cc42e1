"""Forwarding through real sockets: paths, queries, headers, route matching."""

from __future__ import annotations

import pytest


def policy(upstream_url: str, route: str = "/httpbin", extra: str = "") -> str:
    return f'route = "{route}"\nupstream = "{upstream_url}"\n{extra}\n'


async def test_path_and_query_are_forwarded(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"httpbin": policy(upstream.url)})
    async with client.get(f"{sc.url}/httpbin/anything?x=1&y=%20z") as r:
        assert r.status == 200
        assert r.headers["X-Request-ID"]
    assert upstream.seen[-1].path_qs == "/anything?x=1&y=%20z"
    assert upstream.seen[-1].headers["Host"] == f"127.0.0.1:{upstream.port}"


async def test_upstream_base_path_is_prefixed(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"api": policy(upstream.url + "/v2/", route="/api")})
    async with client.get(f"{sc.url}/api/users/7") as r:
        assert r.status == 200
    assert upstream.seen[-1].path_qs == "/v2/users/7"


@pytest.mark.parametrize("path,routed", [
    ("/httpbin", True), ("/httpbin/", True), ("/httpbin/a/b", True),
    ("/httpbinx", False), ("/httpbi", False), ("/other/httpbin", False),
])
async def test_prefix_matches_on_segment_boundary(sidecar_factory, upstream, client, path, routed):
    sc = await sidecar_factory({"httpbin": policy(upstream.url)})
    async with client.get(sc.url + path) as r:
        if routed:
            assert r.status == 200
        else:
            assert r.status == 404
            assert r.headers["X-Sidecar-Error"] == "no_route"
            body = await r.json()
            assert body["error"]["code"] == "no_route"
            assert body["error"]["request_id"] == r.headers["X-Request-ID"]
    assert len(upstream.seen) == (1 if routed else 0)


async def test_longest_prefix_wins(sidecar_factory, client):
    from tests.support.upstream import FakeUpstream

    a, b = await FakeUpstream().start(), await FakeUpstream().start()
    try:
        sc = await sidecar_factory({"a": policy(a.url, "/openai"), "b": policy(b.url, "/openai/v1")})
        async with client.get(f"{sc.url}/openai/v1/models") as r:
            assert r.status == 200
        async with client.get(f"{sc.url}/openai/v2/models") as r:
            assert r.status == 200
        assert [s.path_qs for s in b.seen] == ["/models"]
        assert [s.path_qs for s in a.seen] == ["/v2/models"]
    finally:
        await a.stop()
        await b.stop()
