"""rate_limit: config validation, GCRA units, and end-to-end through real sockets.

Timing tests use short windows and poll or compare against the limiter's own
numbers; nothing asserts on a sleep alone.
"""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import pytest
from pydantic import ValidationError

from plugins.rate_limit import Config
from plugins.rate_limit.gcra import LimitSpec, MemoryStore, SharedStore, decide
from tests.support.upstream import wait_for

ROUTE = "/api"


def policy(upstream_url: str, table: str) -> str:
    return f'route = "{ROUTE}"\nupstream = "{upstream_url}"\n\n[rate_limit]\n{table}\n'


async def send(client: aiohttp.ClientSession, url: str, method: str = "GET", **kw) -> tuple[int, dict, bytes]:
    async with client.request(method, url, **kw) as r:
        return r.status, dict(r.headers), await r.read()


# ---- config validation --------------------------------------------------------

@pytest.mark.parametrize("table,needle", [
    ({}, "without limits"),
    ({"limits": [{"requests": 0, "per": "1s"}]}, "greater than or equal to 1"),
    ({"limits": [{"requests": 1, "per": "soon"}]}, "invalid duration"),
    ({"limits": [{"requests": 1, "per": "1s", "burst": 0}]}, "greater than or equal to 1"),
    ({"limits": [{"requests": 1, "per": "1s"}], "key": "cookie:x"}, "key must be"),
    ({"limits": [{"requests": 1, "per": "1s"}], "key": "header:"}, "valid header name"),
    ({"limits": [{"requests": 1, "per": "1s"}], "on_limit": "queue"}, "needs max_wait"),
    ({"limits": [{"requests": 1, "per": "1s"}], "max_wait": "1s"}, "only applies"),
    ({"limits": [{"requests": 1, "per": "1s"}, {"requests": 1, "per": "1s"}]}, "distinct names"),
    ({"limits": [{"requests": 1, "per": "1s", "name": 'a"b'}]}, "printable ASCII"),
    ({"overrides": [{"match": "POST v1*", "limits": [{"requests": 1, "per": "1s"}]}]}, "start with '/'"),
    ({"overrides": [{"match": "POST /a*b", "limits": [{"requests": 1, "per": "1s"}]}]}, "only allowed at the end"),
    ({"overrides": [{"match": "/a", "limits": []}]}, "at least 1"),
    ({"limits": [{"requests": 1, "per": "1s"}], "typo": 1}, "Extra inputs"),
])
def test_config_rejects(table, needle):
    with pytest.raises(ValidationError) as e:
        Config(**table)
    assert needle in str(e.value)


def test_config_accepts_the_issue_examples():
    c = Config(key="header:X-Tenant-ID", limits=[{"requests": 3, "per": "1s", "burst": 5},
                                                 {"requests": 10000, "per": "1d"}],
               overrides=[{"match": "POST /v1/embeddings*", "limits": [{"requests": 100, "per": "1m"}]}])
    assert [lim.label for lim in c.limits] == ["3/1s", "10000/1d"]
    assert c.overrides[0].parsed() == ("POST", "/v1/embeddings", True)
    assert Config(overrides=[{"match": "/x", "limits": [{"requests": 1, "per": 1}]}]).overrides[0].parsed() == (None, "/x", False)


async def test_bad_policy_is_reported_with_file_and_field(tmp_path, upstream):
    from proxy.errors import ConfigError
    from tests.support.sidecar import start_sidecar

    with pytest.raises(ConfigError) as e:
        await start_sidecar(tmp_path, {"bad": policy(upstream.url, 'limits = [{ requests = 5, per = "1 week" }]')})
    assert "bad.toml" in str(e.value) and "rate_limit.limits.0.per" in str(e.value)


# ---- GCRA units ----------------------------------------------------------------

def test_gcra_burst_then_smooth_refill():
    lim = (LimitSpec.make("x", 2, 1.0, 4),)   # 2/s, burst 4: T = 0.5s
    tats, now = [0.0], 100.0
    admitted = []
    for _ in range(6):
        d, new = decide(tats, now, lim, 0.0)
        admitted.append(d.admitted)
        if new:
            tats = new
    assert admitted == [True] * 4 + [False] * 2
    d, _ = decide(tats, now, lim, 0.0)
    assert d.wait == pytest.approx(0.5) and d.remaining == [0]
    d, new = decide(tats, now + 0.5, lim, 0.0)
    assert d.admitted and d.remaining == [0]
    d, _ = decide(new, now + 0.5 + 0.49, lim, 0.0)
    assert not d.admitted
    # Idle for the whole window: full burst again (reset says when).
    d, _ = decide(new, now + 0.5 + 2.0, lim, 0.0)
    assert d.admitted and d.remaining == [3] and d.reset == [pytest.approx(0.5)]


def test_gcra_multiple_limits_all_or_nothing():
    lims = (LimitSpec.make("fast", 10, 1.0, 10), LimitSpec.make("slow", 3, 60.0, 3))
    tats, now = [0.0, 0.0], 50.0
    for _ in range(3):
        d, tats = decide(tats, now, lims, 0.0)
        assert d.admitted
    d, new = decide(tats, now, lims, 0.0)
    assert not d.admitted and new is None and d.refused_by == 1
    # The refusal consumed nothing from "fast": 7 left there.
    assert d.remaining[0] == 7


def test_gcra_queue_reserves_in_order():
    lim = (LimitSpec.make("x", 1, 1.0, 1),)
    tats, now = [0.0], 10.0
    waits = []
    for _ in range(4):
        d, new = decide(tats, now, lim, 2.5)
        waits.append(d.wait if d.admitted else None)
        if new:
            tats = new
    assert waits == [0.0, pytest.approx(1.0), pytest.approx(2.0), None]


def test_memory_store_sweeps_expired_keys():
    s = MemoryStore()
    lim = (LimitSpec.make("x", 1000, 0.001, 1),)
    for i in range(5000):
        s.decide([f"k{i}"], lim, 0.0)
    time.sleep(0.01)
    for i in range(5000):
        s.decide([f"j{i}"], lim, 0.0)
    assert len(s._tats) < 10000


def test_memory_store_stays_bounded_with_live_keys():
    """Client-chosen key values (a rotating tenant header) on a slow limit stay
    live for a long time: past the cap, those nearest expiry go first (the
    shared table's rule), so memory stays bounded."""
    s = MemoryStore(max_keys=5000)
    lim = (LimitSpec.make("x", 10, 3600.0, 10),)
    for _ in range(10):
        assert s.decide(["hot"], lim, 0.0).admitted  # its whole burst: TAT furthest out
    for i in range(30000):
        s.decide([f"k{i}"], lim, 0.0)
    assert len(s._tats) <= 5000 + 4096
    assert not s.decide(["hot"], lim, 0.0).admitted  # the key with most debt was kept


def test_shared_store_is_one_limit_across_handles(tmp_path):
    # Two handles on one file stand for two worker processes.
    a = SharedStore(str(tmp_path / "t"), slots=1024)
    b = SharedStore(str(tmp_path / "t"))
    assert b.slots == 1024
    lim = (LimitSpec.make("x", 5, 60.0, 5),)
    got = [(a if i % 2 else b).decide(["k"], lim, 0.0).admitted for i in range(8)]
    assert got == [True] * 5 + [False] * 3
    assert a.peek(["k"], lim)[0][0] == 0 and b.peek(["other"], lim)[0][0] == 5
    a.close()
    b.close()


def test_shared_store_is_exact_until_full_then_evicts_nearest_expiry(tmp_path, caplog):
    lim = (LimitSpec.make("x", 1, 60.0, 1),)
    roomy = SharedStore(str(tmp_path / "roomy"), slots=1024)
    for i in range(300):
        assert roomy.decide([f"k{i}"], lim, 0.0).admitted
    assert not any(roomy.decide([f"k{i}"], lim, 0.0).admitted for i in range(300))
    assert "full" not in caplog.text
    roomy.close()
    # 32 slots: one probe window covers the table, so the 33rd key must evict.
    s = SharedStore(str(tmp_path / "tiny"), slots=32)
    for i in range(32):
        assert s.decide([f"k{i}"], lim, 0.0).admitted
    assert s.decide(["new"], lim, 0.0).admitted
    assert "full" in caplog.text
    assert sum(s.peek([f"k{i}"], lim)[0][0] == 0 for i in range(32)) == 31
    assert s.peek(["k0"], lim)[0][0] == 1  # the one nearest expiry went first
    s.close()


# ---- end to end: memory backend ------------------------------------------------

# draft-ietf-httpapi-ratelimit-headers-10 (RFC 8941 Lists of Items with parameters).
_SF_STRING = r'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'
POLICY_ITEM = re.compile(rf'{_SF_STRING};q=\d+;w=\d+')
QUOTA_ITEM = re.compile(rf'{_SF_STRING};r=\d+;t=\d+')


def sf_list(value: str, item: re.Pattern) -> list[str]:
    items = [i.strip() for i in value.split(",")]
    for i in items:
        assert item.fullmatch(i), f"{i!r} is not a valid item"
    return items


async def test_sixth_request_in_a_minute_is_429_with_headers(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"api": policy(upstream.url, '''
        key = "header:X-Tenant-ID"
        limits = [{ requests = 5, per = "1m" }]''')})
    h = {"X-Tenant-ID": "acme"}
    for i in range(5):
        status, headers, _ = await send(client, f"{sc.url}/api/x", headers=h)
        assert status == 200
        assert headers["X-RateLimit-Limit"] == "5"
        assert headers["X-RateLimit-Remaining"] == str(4 - i)
        assert sf_list(headers["RateLimit-Policy"], POLICY_ITEM) == ['"5/1m";q=5;w=60']
        assert sf_list(headers["RateLimit"], QUOTA_ITEM) == [f'"5/1m";r={4 - i};t={headers["X-RateLimit-Reset"]}']
        # Whole seconds until the quota is full again: 12s per request used.
        assert 12 * (i + 1) - 1 <= int(headers["X-RateLimit-Reset"]) <= 12 * (i + 1)
    status, headers, body = await send(client, f"{sc.url}/api/x", headers=h)
    assert status == 429
    assert headers["X-Sidecar-Error"] == "rate_limited"
    assert b'"code":"rate_limited"' in body
    assert 11 <= int(headers["Retry-After"]) <= 12
    assert headers["X-RateLimit-Remaining"] == "0"
    assert sf_list(headers["RateLimit"], QUOTA_ITEM) == [f'"5/1m";r=0;t={headers["X-RateLimit-Reset"]}']
    assert 59 <= int(headers["X-RateLimit-Reset"]) <= 60
    assert len(upstream.seen) == 5
    # Another tenant has its own quota.
    status, _, _ = await send(client, f"{sc.url}/api/x", headers={"X-Tenant-ID": "other"})
    assert status == 200
    await wait_for(lambda: len(sc.access_lines()) == 7)
    lines = sc.access_lines()
    assert lines[5]["status"] == 429
    assert lines[5]["decisions"]["rate_limit"] == {"result": "rejected", "limit": "5/1m"}
    assert lines[0]["decisions"]["rate_limit"] == {"result": "allowed"}
    async with client.get(f"{sc.admin}/metrics") as r:
        text = await r.text()
    assert 'sidecar_rate_limit_decisions_total{limit="5/1m",result="allowed",route="api"} 6.0' in text
    assert 'sidecar_rate_limit_decisions_total{limit="5/1m",result="rejected",route="api"} 1.0' in text


async def test_refill_is_smooth(sidecar_factory, upstream, client):
    # 4 per 4s, burst 2: one request a second after a burst of 2 (a fixed
    # window would wait the whole 4 s). Seconds, not milliseconds, so a
    # loaded machine sends the first three inside one interval.
    sc = await sidecar_factory({"api": policy(upstream.url, 'limits = [{ requests = 4, per = "4s", burst = 2 }]')})
    results = [(await send(client, f"{sc.url}/api/x"))[0] for _ in range(3)]
    assert results == [200, 200, 429]
    t0 = time.monotonic()
    # The limiter's own answer says when: poll instead of sleeping blindly.
    while (await send(client, f"{sc.url}/api/x"))[0] != 200:
        await asyncio.sleep(0.01)
    assert time.monotonic() - t0 < 2.5
    status, headers, _ = await send(client, f"{sc.url}/api/x")
    assert status == 429 and headers["Retry-After"] == "1"


async def test_burst_larger_than_rate(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"api": policy(upstream.url, 'limits = [{ requests = 1, per = "1m", burst = 3 }]')})
    results = [(await send(client, f"{sc.url}/api/x"))[0] for _ in range(4)]
    assert results == [200, 200, 200, 429]


async def test_multiple_limits_consume_from_none_when_one_refuses(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"api": policy(upstream.url, '''
        limits = [{ requests = 3, per = "1s", burst = 5 }, { requests = 6, per = "1d" }]''')})
    statuses = []
    for _ in range(5):
        status, headers, _ = await send(client, f"{sc.url}/api/x")
        statuses.append(status)
    assert statuses == [200] * 5
    status, headers, _ = await send(client, f"{sc.url}/api/x")
    assert status == 429
    # The 1s limit refused; the daily one lost nothing to the refusal.
    assert sf_list(headers["RateLimit-Policy"], POLICY_ITEM) == ['"3/1s";q=3;w=1', '"6/1d";q=6;w=86400']
    items = sf_list(headers["RateLimit"], QUOTA_ITEM)
    assert items[0].startswith('"3/1s";r=0;') and items[1].startswith('"6/1d";r=1;')
    async with client.get(f"{sc.admin}/admin/rate_limits", params={"route": "api", "key": "x"}) as r:
        data = await r.json()
    assert [lim["remaining"] for lim in data["limits"]] == [0, 1]
    # Once the 1s limit has room, the day limit refuses after one more.
    deadline = time.monotonic() + 3
    while (await send(client, f"{sc.url}/api/x"))[0] != 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.4)  # room again on the 1s limit (3/s)
    status, headers, _ = await send(client, f"{sc.url}/api/x")
    assert status == 429
    assert headers["X-RateLimit-Limit"] == "6" and int(headers["Retry-After"]) > 3600
    assert len(upstream.seen) == 6


async def test_overrides_replace_the_route_limits(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"api": policy(upstream.url, '''
        limits = [{ requests = 1, per = "1m" }]
        [[rate_limit.overrides]]
        match = "POST /v1/embeddings*"
        limits = [{ requests = 3, per = "1m" }]
        [[rate_limit.overrides]]
        match = "/health"
        limits = [{ requests = 100, per = "1s", name = "health" }]''')})
    emb = [(await send(client, f"{sc.url}/api/v1/embeddings/x", "POST", data=b"{}"))[0] for _ in range(4)]
    assert emb == [200, 200, 200, 429]
    # GET on the same path is not the override: the route's 1/1m.
    assert [(await send(client, f"{sc.url}/api/v1/embeddings"))[0] for _ in range(2)] == [200, 429]
    # Exact match only (no '*'): /health/x falls back to the route's exhausted limit.
    status, headers, _ = await send(client, f"{sc.url}/api/health")
    assert status == 200 and headers["RateLimit-Policy"] == '"health";q=100;w=1'
    assert (await send(client, f"{sc.url}/api/health/x"))[0] == 429
    async with client.get(f"{sc.admin}/admin/rate_limits") as r:
        data = await r.json()
    (route,) = data["routes"]
    assert data["backend"] == "memory"
    assert route["route"] == "api" and route["limits"][0]["requests"] == 1
    assert [o["match"] for o in route["overrides"]] == ["POST /v1/embeddings*", "/health"]
    async with client.get(f"{sc.admin}/admin/rate_limits", params={"route": "api", "key": "any"}) as r:
        data = await r.json()
    assert data["limits"][0]["remaining"] == 0
    assert data["overrides"][0]["limits"][0]["remaining"] == 0
    assert data["overrides"][1]["limits"][0]["remaining"] in (99, 100)  # refills every 10ms
    async with client.get(f"{sc.admin}/admin/rate_limits", params={"route": "nope"}) as r:
        assert r.status == 404


async def test_queue_mode_is_fifo_and_times_out(sidecar_factory, upstream, client):
    # One request every 500ms; at most 1.1s of waiting.
    sc = await sidecar_factory({"api": policy(upstream.url, '''
        limits = [{ requests = 1, per = "500ms" }]
        on_limit = "queue"
        max_wait = "1100ms"''')})

    async def one(i: int) -> tuple[int, float, dict]:
        t = time.monotonic()
        status, headers, _ = await send(client, f"{sc.url}/api/{i}")
        return status, time.monotonic() - t, headers

    tasks = []
    t0 = time.monotonic()
    for i in range(4):
        tasks.append(asyncio.create_task(one(i)))
        # Start the next only once this one has been decided (queued or sent).
        await wait_for(lambda n=i + 1: _decisions(sc) >= n)
    launched = time.monotonic() - t0
    results = await asyncio.gather(*tasks)
    # 0 goes now; 1 and 2 wait 500ms and 1s; 3 would wait about 1.5s > max_wait.
    assert [s for s, _, _ in results] == [200, 200, 200, 429], launched
    assert [s.path_qs for s in upstream.seen] == ["/0", "/1", "/2"]
    assert results[2][1] >= 0.9 - launched
    assert int(results[3][2]["Retry-After"]) >= 1
    await wait_for(lambda: len(sc.access_lines()) == 4)
    assert sorted(ln["decisions"]["rate_limit"]["result"] for ln in sc.access_lines()) == \
        ["allowed", "queued", "queued", "rejected"]


def _decisions(sc) -> int:
    # Decisions made so far: the limiter's counter, read through the registry.
    m = sc.runtime.metrics.registry
    total = 0
    for fam in m.collect():
        if fam.name == "sidecar_rate_limit_decisions":
            total = sum(s.value for s in fam.samples if s.name.endswith("_total"))
    return int(total)


async def test_shadow_mode_lets_everything_through(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"api": policy(upstream.url, '''
        limits = [{ requests = 2, per = "1m" }]
        enforce = false''')})
    got = [await send(client, f"{sc.url}/api/x") for _ in range(4)]
    assert [s for s, _, _ in got] == [200] * 4
    assert [h["X-RateLimit-Remaining"] for _, h, _ in got] == ["1", "0", "0", "0"]
    assert "Retry-After" not in got[3][1]
    assert len(upstream.seen) == 4
    await wait_for(lambda: len(sc.access_lines()) == 4)
    assert [ln["decisions"]["rate_limit"]["result"] for ln in sc.access_lines()] == \
        ["allowed", "allowed", "shadow_rejected", "shadow_rejected"]


async def test_headers_on_upstream_errors_too(sidecar_factory, upstream, client):
    from aiohttp import web

    async def fail(request, seen):
        return web.Response(status=500, text="boom")

    upstream.responder = fail
    sc = await sidecar_factory({"api": policy(upstream.url, 'limits = [{ requests = 5, per = "1s" }]')})
    status, headers, _ = await send(client, f"{sc.url}/api/x")
    assert status == 500 and headers["X-RateLimit-Remaining"] == "4"


async def test_key_kinds(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"t": f'route = "/t"\nupstream = "{upstream.url}"\ntenant_header = "X-Org"\n'
                                     '[rate_limit]\nkey = "tenant"\nlimits = [{ requests = 1, per = "1m" }]\n',
                                "ip": f'route = "/ip"\nupstream = "{upstream.url}"\n'
                                      '[rate_limit]\nkey = "client_ip"\nlimits = [{ requests = 1, per = "1m" }]\n'})
    assert (await send(client, f"{sc.url}/t/x", headers={"X-Org": "a"}))[0] == 200
    assert (await send(client, f"{sc.url}/t/x", headers={"X-Org": "b"}))[0] == 200
    assert (await send(client, f"{sc.url}/t/x", headers={"X-Org": "a"}))[0] == 429
    assert (await send(client, f"{sc.url}/ip/x"))[0] == 200
    assert (await send(client, f"{sc.url}/ip/x"))[0] == 429
    async with client.get(f"{sc.admin}/admin/rate_limits", params={"route": "ip", "key": "127.0.0.1"}) as r:
        assert (await r.json())["limits"][0]["remaining"] == 0


async def test_reload_keeps_buckets_unless_the_limit_changes(sidecar_factory, upstream, client):
    table = 'limits = [{ requests = 2, per = "1m" }]'
    sc = await sidecar_factory({"api": policy(upstream.url, table)})
    assert [(await send(client, f"{sc.url}/api/x"))[0] for _ in range(3)] == [200, 200, 429]
    sc.write_policy("api", policy(upstream.url, table + '\nenforce = true\nfail_open = false'))
    assert await sc.runtime.reload() == []
    assert (await send(client, f"{sc.url}/api/x"))[0] == 429
    sc.write_policy("api", policy(upstream.url, 'limits = [{ requests = 3, per = "1m" }]'))
    assert await sc.runtime.reload() == []
    assert (await send(client, f"{sc.url}/api/x"))[0] == 200


async def test_long_key_values_are_hashed(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"api": policy(upstream.url, 'key = "header:X-Key"\nlimits = [{ requests = 1, per = "1m" }]')})
    long = "k" * 5000
    assert (await send(client, f"{sc.url}/api/x", headers={"X-Key": long}))[0] == 200
    assert (await send(client, f"{sc.url}/api/x", headers={"X-Key": long}))[0] == 429
    assert (await send(client, f"{sc.url}/api/x", headers={"X-Key": long + "x"}))[0] == 200
    store = sc.runtime.table.routes[0].filters[0].store
    assert max(len(k) for k in store._tats) < 200


async def test_non_utf8_key_values_get_their_own_bucket(sidecar_factory, upstream):
    """aiohttp keeps a non-UTF-8 header byte as a surrogate: short and long
    (hashed) key values with one are limited like any other, never a 500."""
    sc = await sidecar_factory({"api": policy(upstream.url, 'key = "header:X-Key"\nlimits = [{ requests = 1, per = "1m" }]')})
    host, port = sc.url.removeprefix("http://").split(":")

    async def status(value: bytes) -> int:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-Key: " + value + b"\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            return int(head.split(b" ", 2)[1])
        finally:
            writer.close()

    for value in (b"\xe9", b"k" * 200 + b"\xe9"):
        assert await status(value) == 200
        assert await status(value) == 429


def test_shared_store_takes_non_utf8_keys(tmp_path):
    s = SharedStore(str(tmp_path / "t"), slots=1024)
    lim = (LimitSpec.make("x", 1, 60.0, 1),)
    assert s.decide(["t:\udce9"], lim, 0.0).admitted
    assert not s.decide(["t:\udce9"], lim, 0.0).admitted
    assert s.decide(["t:\udce8"], lim, 0.0).admitted
    s.close()


@pytest.mark.parametrize("requests,per,burst,max_wait", [
    (5, 60.0, 5, 0.0), (10, 1.0, 3, 0.0), (2, 1.0, 2, 1.5), (100, 0.5, 1, 0.02)])
def test_single_limit_fast_path_decides_like_decide(monkeypatch, requests, per, burst, max_wait):
    """MemoryStore.decide_one (the filter's one-limit path) must give exactly
    the numbers decide() gives, and leave the same TATs behind."""
    import random
    from types import SimpleNamespace

    from plugins.rate_limit import gcra

    clock = [1000.0]
    monkeypatch.setattr(gcra, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    lim = gcra.LimitSpec.make("l", requests, per, burst)
    a, b = gcra.MemoryStore(), gcra.MemoryStore()
    rng = random.Random(7)
    for _ in range(400):
        clock[0] += rng.choice([0.0, 0.0, lim.interval / 3, lim.interval, lim.interval * 2.5, per])
        d = a.decide(["k"], (lim,), max_wait)
        got = b.decide_one("k", lim, max_wait)
        assert got == (d.admitted, d.wait, d.remaining[0], d.reset[0])
        assert a._tats == b._tats


# ---- a key that is a credential (issue 11, "Also") -------------------------------

ADMIN_VIEWS = ["/admin/rate_limits", "/admin/routes", "/metrics", "/admin/cache", "/admin/breakers"]


@pytest.mark.parametrize("header,logging", [
    ("Authorization", ""),
    ("X-Api-Key", ""),
    ("X-Partner-Token", 'redact_headers = ["X-Partner-Token"]'),
])
async def test_credential_keys_never_reach_admin_output(sidecar_factory, upstream, client, header, logging):
    token = "Bearer sk-live-0123456789abcdef"
    sc = await sidecar_factory({"api": policy(upstream.url, f'key = "header:{header}"\n'
                                                             'limits = [{ requests = 5, per = "1m" }]')},
                               logging=logging)
    for _ in range(2):
        status, _, _ = await send(client, f"{sc.url}/api/x", headers={header: token})
        assert status == 200
    assert (await send(client, f"{sc.url}/api/x", headers={header: "another"}))[0] == 200
    # The lookup takes the raw value and finds that caller's quota...
    async with client.get(f"{sc.admin}/admin/rate_limits", params={"route": "api", "key": token}) as r:
        text = await r.text()
        data = await r.json()
    assert r.status == 200 and data["limits"][0]["remaining"] == 3
    # ...but shows only a keyed hash of it.
    assert token not in text and "sk-live" not in text
    assert re.fullmatch(r"hmac-sha256:[0-9a-f]{32}", data["key_value"])
    for path in ADMIN_VIEWS:
        async with client.get(f"{sc.admin}{path}") as r:
            assert "sk-live" not in await r.text(), path
    lines = await sc.wait_access_lines(3)
    assert "sk-live" not in str(lines)


async def test_ordinary_keys_are_shown_as_sent(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"api": policy(upstream.url, 'key = "header:X-Tenant-ID"\n'
                                                             'limits = [{ requests = 5, per = "1m" }]')})
    assert (await send(client, f"{sc.url}/api/x", headers={"X-Tenant-ID": "acme"}))[0] == 200
    async with client.get(f"{sc.admin}/admin/rate_limits", params={"route": "api", "key": "acme"}) as r:
        data = await r.json()
    assert data["key_value"] == "acme" and data["limits"][0]["remaining"] == 4
