"""Admin listener and policy reload: no dropped requests, bad sets keep the old one."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from tests.support.upstream import FakeUpstream, wait_for


def policy(url: str, route: str = "/p", extra: str = "") -> str:
    return f'route = "{route}"\nupstream = "{url}"\n{extra}\n'


async def test_health_ready_routes(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": policy(upstream.url, extra='[headers]\nrequest = { set = { "X-A" = "1" } }\n')})
    async with client.get(f"{sc.admin}/health") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"
    async with client.get(f"{sc.admin}/ready") as r:
        body = await r.json()
        assert r.status == 200 and body["ready"] is True
        assert body["status"] == "ok"
        assert body["checks"]["policies"]["status"] == "ok"
        assert body["checks"]["state_backend"] == {"status": "ok", "latency_ms": 0.0, "error": None,
                                                   "backend": "memory"}
    async with client.get(f"{sc.admin}/admin/routes") as r:
        (route,) = (await r.json())["routes"]
        assert route["name"] == "p" and route["route"] == "/p" and route["upstream"] == upstream.url
        assert route["chain"][0]["plugin"] == "headers" and route["chain"][0]["priority"] == 900
    async with client.get(f"{sc.admin}/nope") as r:
        assert r.status == 404
        assert r.headers["X-Sidecar-Error"] == "not_found"


async def test_ready_fails_when_redis_is_unreachable(sidecar_factory, upstream, client):
    from tests.support.sidecar import free_port

    port = free_port()
    sc = await sidecar_factory({"p": policy(upstream.url)},
                               f'[state]\nbackend = "redis"\nurl = "redis://:hunter2pw@127.0.0.1:{port}/0"\n')
    async with client.get(f"{sc.admin}/ready") as r:
        assert r.status == 503
        body = await r.json()
    # /ready says why, with the URL's password masked
    assert body["ready"] is False and body["status"] == "down"
    state = body["checks"]["state_backend"]
    assert state["status"] == "down" and state["latency_ms"] >= 0
    assert state["error"].startswith(f"redis at redis://:***@127.0.0.1:{port}/0: ")
    assert "hunter2pw" not in str(body)


async def test_ready_with_real_redis(sidecar_factory, upstream, client, redis_url):
    sc = await sidecar_factory({"p": policy(upstream.url)}, f'[state]\nbackend = "redis"\nurl = "{redis_url}"\n')
    async with client.get(f"{sc.admin}/ready") as r:
        assert r.status == 200


async def test_metrics(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": policy(upstream.url)})
    for _ in range(3):
        async with client.get(f"{sc.url}/p/x") as r:
            assert r.status == 200
    async with client.get(f"{sc.url}/nowhere") as r:
        assert r.status == 404
    async with client.get(f"{sc.admin}/metrics") as r:
        text = await r.text()
        assert r.headers["Content-Type"].startswith("text/plain")
    assert 'sidecar_requests_total{method="GET",route="p",status="200"} 3.0' in text
    assert 'sidecar_requests_total{method="GET",route="",status="404"} 1.0' in text
    assert 'sidecar_request_duration_seconds_count{route="p"} 3.0' in text
    assert 'sidecar_upstream_duration_seconds_count{route="p"} 3.0' in text
    assert "sidecar_inflight_requests 0.0" in text


async def test_file_change_reloads_without_restart(sidecar_factory, client):
    a, b = await FakeUpstream().start(), await FakeUpstream().start()
    try:
        sc = await sidecar_factory({"p": policy(a.url)})
        async with client.get(f"{sc.url}/p/x") as r:
            assert r.status == 200
        sc.write_policy("p", policy(b.url))
        sc.write_policy("q", policy(b.url, "/q"))
        await wait_for(lambda: {r.name for r in sc.runtime.table.routes} == {"p", "q"}
                       and sc.runtime.table.match("/p")[0].upstream.url == b.url, timeout=10)
        async with client.get(f"{sc.url}/p/y") as r:
            assert r.status == 200
        async with client.get(f"{sc.url}/q/z") as r:
            assert r.status == 200
        assert [s.path_qs for s in b.seen] == ["/y", "/z"]
    finally:
        await a.stop()
        await b.stop()


async def test_bad_policy_set_keeps_the_last_good_one(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": policy(upstream.url)})
    sc.write_policy("p", 'route = "/p"\n')  # invalid: no upstream
    async with client.post(f"{sc.admin}/admin/reload") as r:
        assert r.status == 422
        body = await r.json()
        assert body["reloaded"] is False
        assert any("p.toml: (top level): route and upstream go together" in p for p in body["problems"])
    async with client.get(f"{sc.url}/p/x") as r:
        assert r.status == 200
    assert 'sidecar_policy_reloads_total{result="rejected"}' in sc.runtime.metrics.exposition().decode()


async def test_reload_does_not_drop_in_flight_requests(sidecar_factory, client):
    release = asyncio.Event()

    async def slow(request, seen):
        await release.wait()
        return web.Response(text="done")
    up = await FakeUpstream(slow).start()
    try:
        sc = await sidecar_factory({"p": policy(up.url)})
        pending = [asyncio.create_task(client.get(f"{sc.url}/p/{i}")) for i in range(5)]
        await wait_for(lambda: len(up.seen) == 5)
        sc.write_policy("p", policy(up.url, extra='[headers]\nresponse = { set = { "X-New" = "1" } }\n'))
        async with client.post(f"{sc.admin}/admin/reload") as r:
            assert r.status == 200
        release.set()
        for t in pending:
            resp = await t
            assert resp.status == 200
            assert await resp.text() == "done"
            resp.release()
        async with client.get(f"{sc.url}/p/after") as r:
            assert r.headers["X-New"] == "1"
    finally:
        release.set()
        await up.stop()


async def test_filter_state_survives_reload_when_config_unchanged(sidecar_factory, upstream):
    extra = '[headers]\nrequest = { set = { "X-A" = "1" } }\n'
    sc = await sidecar_factory({"p": policy(upstream.url, extra=extra), "q": policy(upstream.url, "/q", extra)})
    before_p = sc.runtime.table.match("/p")[0].filters[0]
    before_q = sc.runtime.table.match("/q")[0].filters[0]
    sc.write_policy("q", policy(upstream.url, "/q", '[headers]\nrequest = { set = { "X-A" = "2" } }\n'))
    assert await sc.runtime.reload() == []
    assert sc.runtime.table.match("/p")[0].filters[0] is before_p
    assert sc.runtime.table.match("/q")[0].filters[0] is not before_q


async def test_filters_dropped_by_a_reload_are_closed_at_stop(sidecar_factory, upstream):
    sc = await sidecar_factory({"p": policy(upstream.url, extra='[headers]\nrequest = { set = { "X-A" = "1" } }\n')})
    old = sc.runtime.table.match("/p")[0].filters[0]
    closed = []

    async def close() -> None:
        closed.append(old)
    old.close = close  # type: ignore[method-assign]
    sc.write_policy("p", policy(upstream.url, extra='[headers]\nrequest = { set = { "X-A" = "2" } }\n'))
    assert await sc.runtime.reload() == []
    assert closed == []  # still within the drain timeout: in-flight requests may use it
    await sc.sidecar.stop()
    assert closed == [old]


@pytest.mark.parametrize("kind", ["fast", "aiohttp"])
async def test_pool_of_an_upstream_a_reload_removed_is_closed_after_the_drain(sidecar_factory, client, kind):
    a, b = await FakeUpstream().start(), await FakeUpstream().start()
    try:
        sc = await sidecar_factory({"p": f'route = "/p"\nupstream = "{a.url}"\n',
                                    "q": f'route = "/q"\nupstream = "{b.url}"\n'}, outbound=f'client = "{kind}"')
        async with client.get(f"{sc.url}/q/x") as r:
            assert r.status == 200
        pools = sc.runtime.pools
        key = (b.url, True, None)
        pool = pools.fast._pools[key] if kind == "fast" else pools._sessions[key]
        (sc.dir / "policies" / "q.toml").unlink()
        assert await sc.runtime.reload() == []
        # Forgotten at once (a later route to b gets a fresh pool) ...
        assert key not in (pools.fast._pools if kind == "fast" else pools._sessions)
        # ... closed only after drain_timeout (5 s here): in-flight requests may still use it.
        assert not pool.closed
        await wait_for(lambda: pool.closed, timeout=15)
        if kind == "fast":
            assert pool.stats()["open"] == 0
        async with client.get(f"{sc.url}/p/x") as r:   # the kept upstream's pool is untouched
            assert r.status == 200
    finally:
        await a.stop()
        await b.stop()
