"""The state backend on a real Redis Cluster of three masters (issue 14, "Fleet scale").

One cluster for the session (tests/support/redis.py LocalCluster), flushed
before each test; two in-process sidecars share it. The test that kills a
master runs last and restarts it, so the cluster is whole afterwards.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import aiohttp
import orjson
import pytest
import stripe
from aiohttp import web

from tests.support.inbound import inbound_config, inbound_url, webhook_policy
from tests.support.redis import LocalCluster
from tests.support.upstream import wait_for

SECRET = "whsec_cluster_test"


@pytest.fixture(scope="session")
def local_cluster():
    c = LocalCluster().start()
    yield c
    c.stop()


@pytest.fixture
def cluster(local_cluster):
    for n in local_cluster.nodes:
        subprocess.run([local_cluster.cli, "-p", str(n.port), "flushall"], check=True, capture_output=True,
                       timeout=5)
    return local_cluster


def state_config(c: LocalCluster, extra: str = "") -> str:
    return f'[state]\nbackend = "redis"\nurl = "{c.url}"\n{extra}'


async def get(client: aiohttp.ClientSession, url: str, **kw) -> tuple[int, dict[str, str], bytes]:
    async with client.get(url, **kw) as r:
        return r.status, dict(r.headers), await r.read()


def masters_holding(c: LocalCluster, keys: list[str]) -> set[int]:
    return {c.slot_owner(k).port for k in keys}


async def cluster_keys(c: LocalCluster, pattern: str) -> list[str]:
    from redis.asyncio.cluster import RedisCluster

    r = RedisCluster.from_url(c.url.replace("redis+cluster", "redis"))
    try:
        return [k.decode() async for k in r.scan_iter(match=pattern)]
    finally:
        await r.aclose()


# ---- rate_limit -----------------------------------------------------------------

TWO_LIMITS = ('[rate_limit]\nkey = "header:X-Tenant-ID"\n'
              'limits = [{ requests = 20, per = "1m" }, { requests = 1000, per = "1h" }]\n')


async def test_rate_limit_is_exact_across_two_sidecars_and_spread_over_masters(
        sidecar_factory, upstream, cluster):
    pol = f'route = "/api"\nupstream = "{upstream.url}"\n{TWO_LIMITS}'
    # A generous timeout: 360 requests at once can lag this loaded test
    # machine's event loop past 250 ms, and a reply read late is a timeout
    # (then a fail-open admission), not what this test is about.
    a = await sidecar_factory({"api": pol}, state_config(cluster, 'timeout = "3s"\n'))
    b = await sidecar_factory({"api": pol}, state_config(cluster, 'timeout = "3s"\n'))
    tenants = [f"t{i}" for i in range(12)]
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def one(i: int) -> tuple[str, int]:
            tenant = tenants[i % len(tenants)]
            async with s.get(f"{(a, b)[i % 2].url}/api/x", headers={"X-Tenant-ID": tenant}) as r:
                await r.read()
                return tenant, r.status
        t0 = time.monotonic()
        results = await asyncio.gather(*(one(i) for i in range(12 * 30)))
        elapsed = time.monotonic() - t0
    # 20 per minute: a burst of 20, then one more every 3 s (GCRA).
    for t in tenants:
        statuses = [st for tenant, st in results if tenant == t]
        assert set(statuses) <= {200, 429}
        assert 20 <= statuses.count(200) <= 20 + int(elapsed / 3), (t, statuses.count(200), elapsed)
    assert len(upstream.seen) == sum(st == 200 for _, st in results)
    # Each decision's two keys share a slot; different tenants spread over the masters.
    keys = await cluster_keys(cluster, "sidecar:test:*:rl:*")
    assert len(keys) == 2 * len(tenants)
    assert len(masters_holding(cluster, keys)) >= 2


# ---- circuit_breaker ------------------------------------------------------------

async def test_breaker_transitions_are_shared_through_the_cluster(sidecar_factory, upstream, client, cluster):
    from plugins.circuit_breaker import registry_of

    async def failing(request: web.Request, seen) -> web.StreamResponse:
        return web.Response(status=500)

    upstream.responder = failing
    pol = (f'route = "/up"\nupstream = "{upstream.url}"\n'
           '[circuit_breaker]\nfailure_threshold = 2\nrecovery_timeout = "30s"\n')
    a = await sidecar_factory({"up": pol}, state_config(cluster))
    b = await sidecar_factory({"up": pol}, state_config(cluster))
    for sc in (a, b):
        await asyncio.wait_for(registry_of(sc.runtime).synced.wait(), 10)
    assert [(await get(client, f"{a.url}/up/"))[0] for _ in range(2)] == [500, 500]
    await wait_for(lambda: registry_of(b.runtime).breakers["up"].state == "open", timeout=5)
    status, headers, _ = await get(client, f"{b.url}/up/")
    assert status == 503 and headers["X-Sidecar-Error"] == "circuit_open"
    assert len(upstream.seen) == 2  # B never called the failing upstream
    async with client.post(f"{b.admin}/admin/breakers/up/reset") as r:
        assert r.status == 200
    await wait_for(lambda: registry_of(a.runtime).breakers["up"].state == "closed", timeout=5)
    # A sidecar started later reads the shared state (MGET over one slot).
    assert [(await get(client, f"{a.url}/up/"))[0] for _ in range(2)] == [500, 500]
    await wait_for(lambda: registry_of(b.runtime).breakers["up"].state == "open", timeout=5)
    c = await sidecar_factory({"up": pol}, state_config(cluster))
    await asyncio.wait_for(registry_of(c.runtime).synced.wait(), 10)
    assert registry_of(c.runtime).breakers["up"].state == "open"


# ---- cache ----------------------------------------------------------------------

async def test_cache_entries_and_vary_markers_are_shared(sidecar_factory, upstream, client, cluster):
    async def cacheable(request: web.Request, seen) -> web.StreamResponse:
        return web.Response(text=f"{request.path} as {request.headers.get('Accept')}",
                            headers={"Cache-Control": "max-age=60", "Vary": "Accept"})

    upstream.responder = cacheable
    pol = f'route = "/p"\nupstream = "{upstream.url}"\n[cache]\n'
    a = await sidecar_factory({"p": pol}, state_config(cluster))
    b = await sidecar_factory({"p": pol}, state_config(cluster))
    paths = [f"/p/item{i}" for i in range(8)]
    for p in paths:
        _, h, _ = await get(client, a.url + p, headers={"Accept": "text/plain"})
        assert h["X-Cache"] == "MISS"

    async def all_hit_on_b() -> bool:
        for p in paths:
            _, h, body = await get(client, b.url + p, headers={"Accept": "text/plain"})
            if h["X-Cache"] != "HIT" or body != f"{p[2:]} as text/plain".encode():  # the route strips /p
                return False
        return True

    deadline = time.monotonic() + 5  # the Redis write follows the last byte
    while not await all_hit_on_b():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    _, h, _ = await get(client, b.url + paths[0], headers={"Accept": "text/html"})
    assert h["X-Cache"] == "MISS"  # another variant
    keys = await cluster_keys(cluster, "sidecar:test:*:cache:p:*")
    # Per URL: a Vary marker and its variants, all under the URL's tag (one slot).
    by_tag: dict[str, set[int]] = {}
    for k in keys:
        by_tag.setdefault(k[k.index("{"):k.index("}") + 1], set()).add(cluster.slot_owner(k).port)
    assert len(by_tag) == len(paths) and all(len(ports) == 1 for ports in by_tag.values())
    assert len(masters_holding(cluster, keys)) >= 2
    async with client.get(f"{b.admin}/admin/cache") as r:
        assert (await r.json())["routes"]["p"]["entries"] == len(keys)  # from the route's index, no SCAN
    async with client.post(f"{a.admin}/admin/cache/p/purge") as r:
        assert (await r.json())["purged"] == len(keys)  # scanned on every master
    _, h, _ = await get(client, b.url + paths[1], headers={"Accept": "text/plain"})
    assert h["X-Cache"] == "MISS"


# ---- webhook queue --------------------------------------------------------------

def signed(event_id: str) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps({"id": event_id, "type": "charge.succeeded", "data": {}})
    return body, {"Stripe-Signature": stripe.WebhookSignature.generate_signature_header(body.decode(), SECRET),
                  "Content-Type": "application/json"}


async def test_webhook_queue_delivers_each_event_exactly_once(sidecar_factory, upstream, client, cluster,
                                                              monkeypatch):
    monkeypatch.setenv("WH_SECRET", SECRET)
    delivered: list[str] = []

    async def service(request: web.Request, seen) -> web.StreamResponse:
        delivered.append(orjson.loads(seen.body)["id"])
        return web.Response(status=200)

    upstream.responder = service
    pol = webhook_policy("/webhooks/stripe", "stripe", ["env:WH_SECRET"], forward_to="/hooks/stripe",
                         raw='retry = { attempts = 50, base = "20ms", max = "100ms" }')
    config = inbound_config(upstream.url, extra=state_config(cluster))
    a = await sidecar_factory({"stripe": pol}, config)
    b = await sidecar_factory({"stripe": pol}, config)
    sent = [f"evt_c{i}" for i in range(16)]
    for i, e in enumerate(sent):
        body, headers = signed(e)
        async with client.post(inbound_url((a, b)[i % 2]) + "/webhooks/stripe", data=body, headers=headers) as r:
            assert r.status == 202, await r.text()
    await wait_for(lambda: len(delivered) >= len(sent), timeout=15)
    svc = a.runtime.services["webhook"]

    async def settled() -> bool:
        depth, _ = await svc.queue.stats("stripe")
        return depth == 0

    deadline = time.monotonic() + 10
    while not await settled():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # a duplicate delivery would show up by now: both loops are idle
    assert delivered == sent  # each once, in order
    # A copy sent to the other sidecar is a duplicate (the de-dup key in the cluster).
    body, headers = signed("evt_c0")
    async with client.post(inbound_url(b) + "/webhooks/stripe", data=body, headers=headers) as r:
        assert r.status == 200 and r.headers["X-Sidecar-Duplicate"] == "1"
    keys = await cluster_keys(cluster, "sidecar:test:{test/webhooks}:*")
    assert any(":stream:" in k for k in keys) and any(":seen:" in k for k in keys)
    assert len(masters_holding(cluster, keys)) == 1  # one slot: MULTI over hash, index and stream


# ---- a master restarted, frozen, killed (last: they stop and restart masters) --------

def split_tenants(cluster: LocalCluster, filters: dict, route: str, victim) -> tuple[list[str], list[str]]:
    """Tenants whose bucket on ``route`` lives on ``victim``, and some that do not."""
    flt = filters[route]

    def owner(t: str):
        return cluster.slot_owner(flt.store.redis_keys(flt.keys_for(flt.default, t))[0])

    tenants = [f"t{i}" for i in range(60)]
    return [t for t in tenants if owner(t) is victim][:3], [t for t in tenants if owner(t) is not victim][:3]


ONE_LIMIT = '[rate_limit]\nkey = "header:X-Tenant-ID"\nlimits = [{ requests = 1000, per = "1m" }]\n'


async def decided(client, sc, route: str, tenants: list[str]) -> list[tuple[int, bool, float]]:
    out = []
    for t in tenants:
        t0 = time.monotonic()
        status, h, _ = await get(client, f"{sc.url}/{route}/x", headers={"X-Tenant-ID": t})
        out.append((status, "X-RateLimit-Remaining" in h, time.monotonic() - t0))
    return out


async def test_a_master_restarted_while_idle_costs_no_request(sidecar_factory, upstream, client, cluster):
    pol = f'route = "/closed"\nupstream = "{upstream.url}"\n{ONE_LIMIT}fail_open = false\n'
    sc = await sidecar_factory({"closed": pol}, state_config(cluster))
    filters = sc.runtime.route_filters("rate_limit")
    victim = cluster.nodes[1]
    doomed, spared = split_tenants(cluster, filters, "closed", victim)
    assert {(s, d) for s, d, _ in await decided(client, sc, "closed", doomed + spared)} == {(200, True)}
    victim.stop()
    victim.start()  # back on its port with its nodes.conf, before the others call it failed
    cluster.wait_ok()
    # The pooled connections to it are dead: each command is sent again once, on a fresh one.
    assert {(s, d) for s, d, _ in await decided(client, sc, "closed", doomed + spared)} == {(200, True)}


async def test_a_frozen_master_costs_the_timeout_for_its_keys_only(sidecar_factory, upstream, client, cluster):
    pol = f'route = "/closed"\nupstream = "{upstream.url}"\n{ONE_LIMIT}fail_open = false\n'
    # 1 s, not less: a pause of this loaded test process must not time out a
    # command before the freeze.
    sc = await sidecar_factory({"closed": pol}, state_config(cluster, 'timeout = "1s"\nbackoff = "3s"\n'))
    filters = sc.runtime.route_filters("rate_limit")
    victim = cluster.nodes[2]
    doomed, spared = split_tenants(cluster, filters, "closed", victim)
    assert {(s, d) for s, d, _ in await decided(client, sc, "closed", doomed + spared)} == {(200, True)}
    victim.freeze()
    try:
        paid = await decided(client, sc, "closed", doomed)   # three timeouts: the node backs off
        assert [s for s, _, _ in paid] == [503] * len(doomed)
        assert all(t < 1.9 for _, _, t in paid), paid   # one timeout (1 s) each, not two
        quick = await decided(client, sc, "closed", doomed * 3)
        assert [s for s, _, _ in quick] == [503] * len(quick)
        assert sorted(t for _, _, t in quick)[len(quick) // 2] < 0.1, quick
        assert sc.runtime.state.guards[f"127.0.0.1:{victim.port}"].refused >= len(quick)
        # The other masters' keys are decided as ever.
        assert {(s, d) for s, d, _ in await decided(client, sc, "closed", spared)} == {(200, True)}
    finally:
        victim.thaw()
    cluster.wait_ok()
    deadline = time.monotonic() + 15
    while (await decided(client, sc, "closed", doomed[:1]))[0][:2] != (200, True):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert {(s, d) for s, d, _ in await decided(client, sc, "closed", doomed + spared)} == {(200, True)}



# ---- rate_limit.upstream (provider quota pacing) -----------------------------

async def test_provider_quota_blocks_are_shared_and_listed_on_a_cluster(sidecar_factory, client, cluster):
    """A block one sidecar learned stops the other; /admin/rate_limits lists
    every key's block, wherever its slot lives."""
    from tests.support.upstream import FakeUpstream

    async def exhausted(request, seen):
        return web.json_response({}, headers={"x-ratelimit-remaining-requests": "0",
                                              "x-ratelimit-reset-requests": "30s"})

    async with FakeUpstream(exhausted) as provider:
        pol = (f'route = "/ai"\nupstream = "{provider.url}"\n[rate_limit]\nkey = "header:X-Org"\n'
               '[rate_limit.upstream]\npreset = "openai"\n')
        a = await sidecar_factory({"ai": pol}, state_config(cluster))
        b = await sidecar_factory({"ai": pol}, state_config(cluster))
        orgs = [f"org{i}" for i in range(12)]
        for org in orgs:
            status, _, _ = await get(client, f"{a.url}/ai/x", headers={"X-Org": org})
            assert status == 200
        for org in orgs:
            status, h, _ = await get(client, f"{b.url}/ai/x", headers={"X-Org": org})
            assert status == 429 and h["X-Sidecar-Error"] == "upstream_quota_exhausted"
        assert len(provider.seen) == len(orgs)
        keys = await cluster_keys(cluster, "sidecar:test:rl-upstream:ai:*")
        assert len(masters_holding(cluster, keys)) >= 2      # no tag ties a route's blocks to one slot
        status, _, body = await get(client, f"{b.admin}/admin/rate_limits?route=ai")
        assert status == 200
        view = orjson.loads(body)["upstream"]
        assert "shared_error" not in view
        assert sorted(x["key"] for x in view["learned"]) == sorted(orgs)
        assert all(25 < x["blocked_for_seconds"] <= 30 for x in view["learned"])


async def test_a_killed_master_fails_its_keys_per_fail_open_then_recovers(
        sidecar_factory, upstream, client, cluster):
    closed = f'route = "/closed"\nupstream = "{upstream.url}"\n{ONE_LIMIT}fail_open = false\n'
    opened = f'route = "/open"\nupstream = "{upstream.url}"\n{ONE_LIMIT}fail_open = true\n'
    # A killed master refuses connections at once: its keys fail without
    # waiting on the timeout. A generous one: at 300 ms, CI once saw a command
    # time out before the kill (a pause of the loaded test process); the 5 s
    # bound below would catch the kill phase paying the timeout.
    sc = await sidecar_factory({"closed": closed, "open": opened}, state_config(cluster, 'timeout = "2s"\n'))
    filters = sc.runtime.route_filters("rate_limit")
    victim = cluster.nodes[0]
    doomed, spared = split_tenants(cluster, filters, "closed", victim)
    # Each route's bucket has its own tag: which tenants live on the victim differs per route.
    doomed_open, _ = split_tenants(cluster, filters, "open", victim)
    assert doomed and doomed_open and spared
    for t in doomed + spared:
        status, h, _ = await get(client, f"{sc.url}/closed/x", headers={"X-Tenant-ID": t})
        assert status == 200 and "X-RateLimit-Remaining" in h

    victim.kill()
    try:
        t0 = time.monotonic()
        for _ in range(3):
            for t in doomed:
                status, h, _ = await get(client, f"{sc.url}/closed/x", headers={"X-Tenant-ID": t})
                assert status == 503 and h["X-Sidecar-Error"] == "rate_limit_unavailable"
            for t in doomed_open:
                status, h, _ = await get(client, f"{sc.url}/open/x", headers={"X-Tenant-ID": t})
                assert status == 200 and "X-RateLimit-Remaining" not in h
            for t in spared:  # the other masters keep deciding their keys
                status, h, _ = await get(client, f"{sc.url}/closed/x", headers={"X-Tenant-ID": t})
                assert status == 200 and "X-RateLimit-Remaining" in h
        assert time.monotonic() - t0 < 5
    finally:
        # No replicas: the cluster heals when the master comes back on its
        # port with its nodes.conf and takes its slots again.
        victim.start()
    cluster.wait_ok()
    deadline = time.monotonic() + 15
    while True:
        status, h, _ = await get(client, f"{sc.url}/closed/x", headers={"X-Tenant-ID": doomed[0]})
        if status == 200 and "X-RateLimit-Remaining" in h:
            break
        assert time.monotonic() < deadline, (status, h)
        await asyncio.sleep(0.1)
    for t in doomed + spared:
        status, h, _ = await get(client, f"{sc.url}/closed/x", headers={"X-Tenant-ID": t})
        assert status == 200 and "X-RateLimit-Remaining" in h
