"""The state backend against a Redis of the test's own (issue 11 item 5):
restarted while the sidecar is idle, frozen with SIGSTOP, thawed; and the
backend interface every plugin store is written against."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from pydantic import ValidationError

from proxy.config import StateSettings
from proxy.state import MemoryState, RedisState, StateBackend, StateBackingOff, make_state
from tests.support.redis import ThrowawayRedis


@pytest.fixture
def own_redis():
    r = ThrowawayRedis().start()
    yield r
    r.cleanup()


def limited(upstream_url: str, fail_open: bool) -> str:
    return (f'route = "/api"\nupstream = "{upstream_url}"\n[rate_limit]\n'
            f'limits = [{{ requests = 100000, per = "1m" }}]\nfail_open = {str(fail_open).lower()}\n')


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], float]:
    t0 = time.monotonic()
    async with client.get(url) as r:
        await r.read()
        return r.status, dict(r.headers), time.monotonic() - t0


async def test_a_redis_restart_while_idle_costs_no_request(sidecar_factory, upstream, client, own_redis):
    sc = await sidecar_factory({"api": limited(upstream.url, fail_open=False)},
                               f'[state]\nbackend = "redis"\nurl = "{own_redis.url}"\n')
    # Several pooled connections, all of which the restart will kill.
    first = await asyncio.gather(*(get(client, f"{sc.url}/api/x") for _ in range(16)))
    assert {s for s, _, _ in first} == {200}
    own_redis.stop()
    own_redis.start()
    after = await asyncio.gather(*(get(client, f"{sc.url}/api/x") for _ in range(16)))
    assert [s for s, _, _ in after] == [200] * 16
    assert all("X-RateLimit-Remaining" in h for _, h, _ in after)  # decided by Redis, not failed open
    async with client.get(f"{sc.admin}/ready") as r:
        assert r.status == 200, await r.text()
    async with client.get(f"{sc.admin}/metrics") as r:
        assert 'sidecar_rate_limit_backend_errors_total{route="api"} 0.0' in await r.text()


@pytest.mark.parametrize("fail_open", [True, False])
async def test_a_frozen_redis_costs_the_timeout_then_nothing_until_it_thaws(
        sidecar_factory, upstream, client, own_redis, fail_open):
    sc = await sidecar_factory({"api": limited(upstream.url, fail_open)},
                               f'[state]\nbackend = "redis"\nurl = "{own_redis.url}"\n'
                               f'timeout = "400ms"\nbackoff = "3s"\n')
    url = f"{sc.url}/api/x"
    status, headers, _ = await get(client, url)
    assert status == 200 and "X-RateLimit-Remaining" in headers
    want = 200 if fail_open else 503
    own_redis.freeze()
    try:
        # Three consecutive timeouts, each bounded by [state] timeout (the
        # connection, then a fresh one's handshake): no 2 s waits.
        paid = [await get(client, url) for _ in range(3)]
        assert [s for s, _, _ in paid] == [want] * 3
        # (upper bound generous: a loaded machine delays the loop, not Redis)
        assert all(0.3 < t < 2.0 for _, _, t in paid), [t for _, _, t in paid]
        # Backing off: answered at once, per the plugin's fail-open setting,
        # every one refused before reaching Redis.
        guard = sc.runtime.state.guards[f"127.0.0.1:{own_redis.port}"]
        refused = guard.refused
        backing_off = time.monotonic()
        quick = []
        while time.monotonic() - backing_off < 1.5:
            quick.append(await get(client, url))
        assert len(quick) >= 5
        assert {s for s, _, _ in quick} == {want}
        assert guard.refused - refused >= len(quick)
        times = sorted(t for _, _, t in quick)
        # None waited for Redis: the guard refused each (counted above); the
        # median shows it, while a loaded machine may stretch the odd one.
        assert times[len(times) // 2] < 0.2, times[-3:]
        if not fail_open:
            assert quick[0][1]["X-Sidecar-Error"] == "rate_limit_unavailable"
    finally:
        own_redis.thaw()
    # Recovery: once the back-off ends, one probe finds Redis answering.
    deadline = time.monotonic() + 10
    while True:
        status, headers, _ = await get(client, url)
        if status == 200 and "X-RateLimit-Remaining" in headers:
            break
        assert time.monotonic() < deadline, "no recovery after SIGCONT"
        await asyncio.sleep(0.05)
    assert [(await get(client, url))[0] for _ in range(5)] == [200] * 5
    async with client.get(f"{sc.admin}/ready") as r:
        assert r.status == 200


async def test_backoff_on_the_state_api_itself(own_redis):
    state = RedisState("t", own_redis.url, timeout=0.3, backoff=30)
    try:
        await state.set("k", "v")
        assert await state.get("k") == b"v"
        own_redis.freeze()
        try:
            for _ in range(3):
                t0 = time.monotonic()
                with pytest.raises(Exception) as e:
                    await state.get("k")
                assert not isinstance(e.value, StateBackingOff)
                assert time.monotonic() - t0 < 1.2
            t0 = time.monotonic()
            with pytest.raises(StateBackingOff):
                await state.get("k")
            assert time.monotonic() - t0 < 0.05
            assert await state.ping() is False
        finally:
            own_redis.thaw()
        # The pause is 30 s: nothing reaches Redis until it ends.
        with pytest.raises(StateBackingOff):
            await state.get("k")
        guard = state.guards[f"127.0.0.1:{own_redis.port}"]
        guard.until = time.monotonic()  # the pause is over: the next command probes
        assert await state.get("k") == b"v"
        assert guard.failures == 0 and await state.ping() is True
    finally:
        await state.close()


async def test_memory_and_redis_implement_one_interface(redis_url):
    redis_state = RedisState("svc", redis_url)
    memory = MemoryState("svc")
    try:
        for state in (memory, redis_state):
            assert isinstance(state, StateBackend)
            assert (state.redis is None) is (state is memory)
            assert state.shared is (state is redis_state)
            k = state.key("a", "b")
            assert k == "sidecar:svc:a:b"
            assert await state.set_nx(k, "é", ttl=5) is True
            assert await state.set_nx(k, b"other", ttl=5) is False
            assert await state.get(k) == "é".encode()  # bytes from both backends
            await state.delete(k)
            assert await state.get(k) is None
            assert await state.ping() is True
    finally:
        await redis_state.close()


def test_hash_tags_put_related_keys_in_one_slot():
    from redis.crc import key_slot

    s = MemoryState("billing")
    a, b = s.tagged("t1", "x"), s.tagged("t1", "y", "z")
    assert a == "sidecar:billing:{billing/t1}:x"
    assert key_slot(a.encode()) == key_slot(b.encode())
    # A tag with a brace cannot end early; a service name with braces cannot become the tag.
    odd = MemoryState("we{ir}d")
    k = odd.tagged("a}b", "x")
    assert "{ir}" not in k and k.count("{") == 1 and k.count("}") == 1
    assert key_slot(k.encode()) == key_slot(odd.tagged("a}b", "y").encode())


async def test_state_settings():
    s = StateSettings(backend="redis", url="redis+cluster://10.0.0.1:7000", timeout="100ms")
    assert s.timeout == 0.1 and s.backoff == 1.0
    st = make_state(s, "svc")
    assert st.kind == "redis-cluster"
    await st.close()
    st = make_state(StateSettings(backend="redis", url="redis://10.0.0.1:7000", cluster=True), "svc")
    assert st.kind == "redis-cluster" and st.redis is not None
    await st.close()
    st = make_state(StateSettings(url="redis+cluster://10.0.0.1:7000"), "svc")  # backend memory: url ignored
    assert st.kind == "memory" and st.redis is None
    with pytest.raises(Exception, match="url must start with"):
        StateSettings(url="http://redis:6379")
    with pytest.raises(ValidationError, match="timeout"):
        StateSettings(timeout="0s")
