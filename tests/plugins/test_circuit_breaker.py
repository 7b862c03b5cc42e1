"""circuit_breaker: config validation, the state machine end to end, admin, Redis sharing."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from aiohttp import web
from pydantic import ValidationError

from plugins.circuit_breaker import Config, _Window
from tests.support.sidecar import free_port
from tests.support.upstream import FakeUpstream, wait_for


def policy(url: str, breaker: str, extra: str = "") -> str:
    return f'route = "/up"\nupstream = "{url}"\n{extra}\n[circuit_breaker]\n{breaker}\n'


def status(code: int, headers: dict[str, str] | None = None):
    async def respond(request, seen):
        return web.Response(status=code, text=f"status {code}", headers=headers)
    return respond


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, dict, bytes]:
    async with client.get(url) as r:
        return r.status, dict(r.headers), await r.read()


async def breakers(client, sc) -> dict:
    async with client.get(f"{sc.admin}/admin/breakers") as r:
        assert r.status == 200
        return await r.json()


# ---- config ----------------------------------------------------------------

@pytest.mark.parametrize("bad,word", [
    ({"failure_statuses": [404]}, "not a 5xx"),
    ({"recovery_timeout": "0s"}, "recovery_timeout"),
    ({"failure_threshold": 0}, "greater than or equal to 1"),
    ({"half_open_max": 0}, "greater than or equal to 1"),
    ({"failure_ratio": 1.5}, "less than or equal to 1"),
    ({"window": "0s"}, "window"),
    ({"threshold": 3}, "Extra inputs"),
])
def test_config_rejects(bad, word):
    with pytest.raises(ValidationError) as e:
        Config(**bad)
    assert word in str(e.value)


def test_config_defaults_and_durations():
    c = Config(recovery_timeout="250ms", window="2s")
    assert (c.failure_threshold, c.recovery_timeout, c.half_open_max, c.window) == (5, 0.25, 1, 2.0)
    assert c.failure_statuses == [500, 502, 503, 504] and c.failure_ratio is None


async def test_bad_policy_is_refused_with_file_and_field(sidecar_factory, upstream):
    from proxy.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        await sidecar_factory({"up": policy(upstream.url, "failure_statuses = [429]")})
    assert "up.toml: circuit_breaker.failure_statuses" in str(e.value)


def test_window_slides():
    w = _Window(1.0)  # ten buckets of 100 ms
    w.add(True, 10.0)
    w.add(False, 10.55)
    assert w.counts(10.6) == (2, 1)
    assert w.counts(11.05) == (1, 0)   # the 10.0 bucket has left the window
    assert w.counts(12.0) == (0, 0)


# ---- state machine, end to end ----------------------------------------------

async def test_opens_after_consecutive_failures_then_fails_fast(sidecar_factory, upstream, client, caplog):
    caplog.set_level(logging.INFO, "sidecar.circuit_breaker")
    upstream.responder = status(500)
    sc = await sidecar_factory({"up": policy(upstream.url, 'failure_threshold = 3\nrecovery_timeout = "30s"')})
    for _ in range(3):
        code, _, _ = await get(client, f"{sc.url}/up/x")
        assert code == 500
    for _ in range(4):
        code, headers, body = await get(client, f"{sc.url}/up/x")
        assert code == 503
        assert headers["X-Sidecar-Error"] == "circuit_open"
        assert 29 <= int(headers["Retry-After"]) <= 30
        assert b"circuit_open" in body
    assert len(upstream.seen) == 3  # none while open
    state = (await breakers(client, sc))["up"]
    assert state["state"] == "open" and 0 < state["retry_in"] <= 30
    assert any("up: closed -> open" in r.getMessage() for r in caplog.records)
    async with client.get(f"{sc.admin}/metrics") as r:
        assert 'sidecar_circuit_state{route="up"} 1.0' in await r.text()
    lines = [line for line in sc.access_lines() if line["status"] == 503]
    assert lines and lines[-1]["error"] == "circuit_open"


async def test_success_resets_the_consecutive_count(sidecar_factory, upstream, client):
    fail = {"on": True}

    async def respond(request, seen):
        return web.Response(status=502 if fail["on"] else 200)

    upstream.responder = respond
    sc = await sidecar_factory({"up": policy(upstream.url, "failure_threshold = 3")})
    for _ in range(2):
        assert (await get(client, f"{sc.url}/up/"))[0] == 502
    fail["on"] = False
    assert (await get(client, f"{sc.url}/up/"))[0] == 200
    fail["on"] = True
    for _ in range(2):
        assert (await get(client, f"{sc.url}/up/"))[0] == 502
    assert (await breakers(client, sc))["up"]["state"] == "closed"
    assert (await get(client, f"{sc.url}/up/"))[0] == 502
    assert (await get(client, f"{sc.url}/up/"))[0] == 503
    assert len(upstream.seen) == 6


async def test_4xx_is_not_a_failure(sidecar_factory, upstream, client):
    upstream.responder = status(404)
    sc = await sidecar_factory({"up": policy(upstream.url, "failure_threshold = 2")})
    for _ in range(5):
        assert (await get(client, f"{sc.url}/up/"))[0] == 404
    assert len(upstream.seen) == 5
    b = (await breakers(client, sc))["up"]
    assert b["state"] == "closed" and b["failures"] == 0


async def test_connect_errors_open_the_circuit(sidecar_factory, client):
    dead = f"http://127.0.0.1:{free_port()}"
    sc = await sidecar_factory({"up": policy(dead, "failure_threshold = 2")})
    for _ in range(2):
        code, headers, _ = await get(client, f"{sc.url}/up/")
        assert code == 502 and headers["X-Sidecar-Error"] == "upstream_unavailable"
    code, headers, _ = await get(client, f"{sc.url}/up/")
    assert code == 503 and headers["X-Sidecar-Error"] == "circuit_open"


async def test_timeouts_open_the_circuit(sidecar_factory, upstream, client):
    async def hang(request, seen):
        await asyncio.sleep(5)
        return web.Response()

    upstream.responder = hang
    sc = await sidecar_factory({"up": policy(upstream.url, "failure_threshold = 1",
                                             extra='[timeouts]\ntotal = "150ms"')})
    assert (await get(client, f"{sc.url}/up/"))[0] == 504
    assert (await get(client, f"{sc.url}/up/"))[0] == 503
    assert len(upstream.seen) == 1


async def _open_and_wait_half_open(client, sc, upstream, n: int) -> None:
    for _ in range(n):
        assert (await get(client, f"{sc.url}/up/"))[0] == 500
    assert (await breakers(client, sc))["up"]["state"] == "open"

    async def ready():
        return (await breakers(client, sc))["up"]["retry_in"] == 0

    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    while not await ready():
        assert loop.time() < end, "recovery_timeout never elapsed"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("half_open_max", [1, 2])
async def test_half_open_lets_exactly_half_open_max_trials_through(sidecar_factory, upstream, client,
                                                                   half_open_max):
    release = asyncio.Event()
    mode = {"fail": True}

    async def respond(request, seen):
        if mode["fail"]:
            return web.Response(status=500)
        await release.wait()
        return web.Response(text="recovered")

    upstream.responder = respond
    sc = await sidecar_factory({"up": policy(
        upstream.url, f'failure_threshold = 2\nrecovery_timeout = "200ms"\nhalf_open_max = {half_open_max}')})
    await _open_and_wait_half_open(client, sc, upstream, 2)
    mode["fail"] = False
    tasks = [asyncio.create_task(get(client, f"{sc.url}/up/t")) for _ in range(6)]
    await wait_for(lambda: len(upstream.seen) == 2 + half_open_max)
    refused = [t for t in tasks if t.done()]
    await wait_for(lambda: sum(t.done() for t in tasks) == 6 - half_open_max)
    for t in tasks:
        if t.done():
            code, headers, _ = t.result()
            assert code == 503 and headers["X-Sidecar-Error"] == "circuit_open"
    b = (await breakers(client, sc))["up"]
    assert b["state"] == "half_open" and b["half_open_trials"] == half_open_max
    release.set()
    results = await asyncio.gather(*tasks)
    assert sorted(r[0] for r in results) == [200] * half_open_max + [503] * (6 - half_open_max)
    assert len(upstream.seen) == 2 + half_open_max
    assert (await breakers(client, sc))["up"]["state"] == "closed"
    assert (await get(client, f"{sc.url}/up/after"))[0] == 200
    del refused


async def test_failed_trial_reopens(sidecar_factory, upstream, client):
    upstream.responder = status(503)
    # 2 s, not 200 ms: the checks after the failed trial must fall inside the
    # new open window, however slow a loaded machine is.
    sc = await sidecar_factory({"up": policy(upstream.url, 'failure_threshold = 2\nrecovery_timeout = "2s"')})
    await _open_and_wait_half_open_503(client, sc)
    assert (await get(client, f"{sc.url}/up/"))[0] == 503  # the trial, from the upstream
    assert len(upstream.seen) == 3
    b = (await breakers(client, sc))["up"]
    assert b["state"] == "open" and b["retry_in"] > 0
    code, headers, _ = await get(client, f"{sc.url}/up/")
    assert headers["X-Sidecar-Error"] == "circuit_open"
    assert len(upstream.seen) == 3


async def _open_and_wait_half_open_503(client, sc) -> None:
    for _ in range(2):
        assert (await get(client, f"{sc.url}/up/"))[0] == 503
    await wait_for_async(client, sc, lambda b: b["state"] == "open")
    await wait_for_async(client, sc, lambda b: b["retry_in"] == 0)


async def wait_for_async(client, sc, pred, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred((await breakers(client, sc))["up"]):
        assert loop.time() < end, "breaker never reached the expected state"
        await asyncio.sleep(0.02)


async def test_client_disconnect_is_not_a_failure(sidecar_factory, upstream, client):
    async def hang(request, seen):
        await asyncio.sleep(5)
        return web.Response()

    upstream.responder = hang
    sc = await sidecar_factory({"up": policy(upstream.url, "failure_threshold = 1")})
    for _ in range(3):
        with pytest.raises(asyncio.TimeoutError):
            async with client.get(f"{sc.url}/up/", timeout=aiohttp.ClientTimeout(total=0.15)):
                pass
    await wait_for(lambda: len(upstream.seen) == 3)
    await wait_for(lambda: [line["status"] for line in sc.access_lines()] == [499] * 3)
    b = (await breakers(client, sc))["up"]
    assert b["state"] == "closed" and b["failures"] == 0


async def test_trial_cancelled_by_client_keeps_half_open(sidecar_factory, upstream, client):
    mode = {"fail": True}

    async def respond(request, seen):
        if mode["fail"]:
            return web.Response(status=500)
        await asyncio.sleep(5)
        return web.Response()

    upstream.responder = respond
    sc = await sidecar_factory({"up": policy(upstream.url, 'failure_threshold = 1\nrecovery_timeout = "200ms"')})
    await _open_and_wait_half_open(client, sc, upstream, 1)
    mode["fail"] = False
    # The trial hangs 5 s; the client leaves after 1 s (time enough for the
    # request to reach the sidecar on a loaded machine, 0.2 s was not always).
    with pytest.raises(asyncio.TimeoutError):
        async with client.get(f"{sc.url}/up/", timeout=aiohttp.ClientTimeout(total=1.0)):
            pass
    await wait_for(lambda: [line["status"] for line in sc.access_lines()][-1:] == [499])
    await wait_for_async(client, sc, lambda b: b["half_open_trials"] == 0)
    b = (await breakers(client, sc))["up"]
    assert b["state"] == "half_open"  # neither closed by a "success" nor reopened
    upstream.responder = status(200)
    assert (await get(client, f"{sc.url}/up/"))[0] == 200
    assert (await breakers(client, sc))["up"]["state"] == "closed"


async def test_ratio_trip(sidecar_factory, upstream, client):
    n = {"i": 0}

    async def alternate(request, seen):
        n["i"] += 1
        return web.Response(status=500 if n["i"] % 2 == 0 else 200)

    upstream.responder = alternate
    sc = await sidecar_factory({"up": policy(upstream.url, 'failure_threshold = 100\nfailure_ratio = 0.5\n'
                                             'window = "10s"\nmin_requests = 6')})
    codes = [(await get(client, f"{sc.url}/up/"))[0] for _ in range(5)]
    assert codes == [200, 500, 200, 500, 200]
    b = (await breakers(client, sc))["up"]
    assert b["state"] == "closed" and b["window"] == {
        "requests": 5, "failures": 2, "failure_ratio": 0.5, "min_requests": 6, "seconds": 10.0}
    assert (await get(client, f"{sc.url}/up/"))[0] == 500   # 3 of 6 failed: trips
    assert (await breakers(client, sc))["up"]["state"] == "open"
    assert (await get(client, f"{sc.url}/up/"))[0] == 503
    assert len(upstream.seen) == 6


async def test_admin_reset(sidecar_factory, upstream, client):
    upstream.responder = status(500)
    sc = await sidecar_factory({"up": policy(upstream.url, "failure_threshold = 1")})
    await get(client, f"{sc.url}/up/")
    assert (await get(client, f"{sc.url}/up/"))[0] == 503
    async with client.post(f"{sc.admin}/admin/breakers/up/reset") as r:
        assert r.status == 200
        assert (await r.json())["up"]["state"] == "closed"
    assert (await get(client, f"{sc.url}/up/"))[0] == 500
    assert len(upstream.seen) == 2
    async with client.post(f"{sc.admin}/admin/breakers/nope/reset") as r:
        assert r.status == 404 and r.headers["X-Sidecar-Error"] == "no_breaker"


# ---- shared through Redis ---------------------------------------------------

async def test_transitions_propagate_between_sidecars_through_redis(sidecar_factory, upstream, client,
                                                                   redis_url, caplog):
    caplog.set_level(logging.INFO, "sidecar.circuit_breaker")
    upstream.responder = status(500)
    state = f'[state]\nbackend = "redis"\nurl = "{redis_url}"\n'
    pol = policy(upstream.url, 'failure_threshold = 2\nrecovery_timeout = "30s"')
    a = await sidecar_factory({"up": pol}, state)
    b = await sidecar_factory({"up": pol}, state)
    from plugins.circuit_breaker import registry_of

    for sc in (a, b):
        await asyncio.wait_for(registry_of(sc.runtime).synced.wait(), 5)
    for _ in range(2):
        assert (await get(client, f"{a.url}/up/"))[0] == 500
    # Pub/sub is the only way B learns of it (no polling): a generous timeout
    # tells a lost message from a slow one on a loaded machine.
    await wait_for_async(client, b, lambda s: s["state"] == "open")
    retry_in = (await breakers(client, b))["up"]["retry_in"]
    assert 25 < retry_in <= 30  # A's opening time, not B's
    code, headers, _ = await get(client, f"{b.url}/up/")
    assert code == 503 and headers["X-Sidecar-Error"] == "circuit_open"
    assert len(upstream.seen) == 2  # B never called the failing upstream
    assert any("closed -> open (from a peer sidecar)" in r.getMessage() for r in caplog.records)
    # An operator's reset on B closes A too.
    async with client.post(f"{b.admin}/admin/breakers/up/reset") as r:
        assert r.status == 200
    await wait_for_async(client, a, lambda s: s["state"] == "closed")
    assert (await get(client, f"{a.url}/up/"))[0] == 500
    # A sidecar started later picks up the open state from Redis.
    assert (await get(client, f"{a.url}/up/"))[0] == 500
    await wait_for_async(client, a, lambda s: s["state"] == "open")
    c = await sidecar_factory({"up": pol}, state)
    await asyncio.wait_for(registry_of(c.runtime).synced.wait(), 5)
    assert (await breakers(client, c))["up"]["state"] == "open"


async def test_a_peers_failed_trial_restarts_the_wait_everywhere(sidecar_factory, upstream, client, redis_url):
    from plugins.circuit_breaker import registry_of

    upstream.responder = status(500)
    state = f'[state]\nbackend = "redis"\nurl = "{redis_url}"\n'
    # Seconds, not milliseconds: B must see A's reopening well inside the
    # window, however slowly a loaded machine relays it.
    pol = policy(upstream.url, 'failure_threshold = 1\nrecovery_timeout = "3s"')
    a = await sidecar_factory({"up": pol}, state)
    b = await sidecar_factory({"up": pol}, state)
    for sc in (a, b):
        await asyncio.wait_for(registry_of(sc.runtime).synced.wait(), 5)
    assert (await get(client, f"{a.url}/up/"))[0] == 500
    await wait_for_async(client, b, lambda s: s["state"] == "open")
    await wait_for_async(client, a, lambda s: s["retry_in"] == 0, timeout=15)
    assert (await get(client, f"{a.url}/up/"))[0] == 500   # A's trial fails: A reopens
    assert (await breakers(client, a))["up"]["state"] == "open"
    # B waits from A's new opening time instead of sending its own doomed trial now.
    await wait_for_async(client, b, lambda s: s["retry_in"] > 1.5)
    assert (await get(client, f"{b.url}/up/"))[1]["X-Sidecar-Error"] == "circuit_open"
    assert len(upstream.seen) == 2


async def test_reset_of_a_closed_breaker_still_closes_its_peers(sidecar_factory, upstream, client, redis_url):
    from plugins.circuit_breaker import registry_of

    upstream.responder = status(500)
    state = f'[state]\nbackend = "redis"\nurl = "{redis_url}"\n'
    pol = policy(upstream.url, "failure_threshold = 1")
    a = await sidecar_factory({"up": pol}, state)
    b = await sidecar_factory({"up": pol}, state)
    for sc in (a, b):
        await asyncio.wait_for(registry_of(sc.runtime).synced.wait(), 5)
    await get(client, f"{a.url}/up/")
    await wait_for_async(client, b, lambda s: s["state"] == "open")
    # B missed a transition (say Redis blinked) and is closed while A is open.
    bb = registry_of(b.runtime).breakers["up"]
    bb.remote = True
    bb.cb.close()
    bb.remote = False
    assert (await breakers(client, b))["up"]["state"] == "closed"
    async with client.post(f"{b.admin}/admin/breakers/up/reset") as r:
        assert r.status == 200
    await wait_for_async(client, a, lambda s: s["state"] == "closed")


async def test_memory_backend_keeps_breakers_local(sidecar_factory, upstream, client):
    upstream.responder = status(500)
    pol = policy(upstream.url, "failure_threshold = 1")
    a = await sidecar_factory({"up": pol})
    b = await sidecar_factory({"up": pol})
    await get(client, f"{a.url}/up/")
    assert (await breakers(client, a))["up"]["state"] == "open"
    assert (await get(client, f"{b.url}/up/"))[0] == 500
    assert len(upstream.seen) == 2


async def test_upstream_recovering_after_a_delay_closes_the_circuit(sidecar_factory, client):
    up = FakeUpstream(status(503))
    await up.start()
    try:
        sc = await sidecar_factory({"up": policy(up.url, 'failure_threshold = 2\nrecovery_timeout = "150ms"')})
        for _ in range(2):
            await get(client, f"{sc.url}/up/")
        loop = asyncio.get_running_loop()
        recover_at = loop.time() + 0.4
        seen_by_client = []
        while loop.time() < recover_at + 2.0 and seen_by_client[-1:] != [(200, None)]:
            if loop.time() >= recover_at:
                up.responder = status(200)
            code, headers, _ = await get(client, f"{sc.url}/up/")
            seen_by_client.append((code, headers.get("X-Sidecar-Error")))
            await asyncio.sleep(0.03)
        assert seen_by_client[-1] == (200, None)
        assert (await breakers(client, sc))["up"]["state"] == "closed"
        from_upstream = [c for c in seen_by_client if c[1] is None]
        # Only trials reached the upstream while it failed: one per recovery_timeout.
        assert 1 <= len(from_upstream) <= 5
        assert ("circuit_open" in {c[1] for c in seen_by_client})
        assert len(up.seen) == 2 + len(from_upstream)
    finally:
        await up.stop()



async def test_breaker_state_survives_a_reload_that_keeps_its_config(sidecar_factory, upstream, client):
    upstream.responder = status(500)
    sc = await sidecar_factory({"up": policy(upstream.url, "failure_threshold = 1")})
    await get(client, f"{sc.url}/up/")
    assert (await breakers(client, sc))["up"]["state"] == "open"
    sc.write_policy("up", policy(upstream.url, "failure_threshold = 1", extra='description = "edited"'))
    async with client.post(f"{sc.admin}/admin/reload") as r:
        assert r.status == 200
    assert (await breakers(client, sc))["up"]["state"] == "open"
    sc.write_policy("up", policy(upstream.url, "failure_threshold = 2"))
    async with client.post(f"{sc.admin}/admin/reload") as r:
        assert r.status == 200
    b = (await breakers(client, sc))["up"]
    assert b["state"] == "closed" and b["failure_threshold"] == 2
