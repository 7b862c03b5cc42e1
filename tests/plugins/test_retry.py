"""retry: which requests are retried, how often, how long apart, and within what budget."""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from pydantic import ValidationError

from plugins.retry import Config, RetryBudget, RetryFilter, retries_counter, retry_after
from proxy.chain import Exchange, ProxyResponse
from tests.support.sidecar import free_port
from tests.support.upstream import FakeUpstream, wait_for

FAST = 'backoff = { base = "1ms", max = "5ms" }'


def policy(url: str, retry: str, extra: str = "") -> str:
    return f'route = "/up"\nupstream = "{url}"\n{extra}\n[retry]\n{retry}\n'


def script(*steps):
    """A responder that plays ``steps`` in order, then repeats the last one.

    A step is a status code, "hang", "reset", or (status, headers).
    """
    calls = {"n": 0}

    async def respond(request, seen):
        step = steps[min(calls["n"], len(steps) - 1)]
        calls["n"] += 1
        if step == "hang":
            await asyncio.sleep(10)
        if step == "reset":
            request.transport.abort()
            await asyncio.sleep(1)
        code, headers = step if isinstance(step, tuple) else (step, {})
        return web.Response(status=code, text=f"try {calls['n']}: {code}", headers=headers)

    return respond


async def call(client, method: str, url: str, **kw) -> tuple[int, dict, bytes]:
    async with client.request(method, url, **kw) as r:
        return r.status, dict(r.headers), await r.read()


async def metric(client, sc, reason: str) -> float:
    async with client.get(f"{sc.admin}/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith("sidecar_retries_total{") and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---- config and units -------------------------------------------------------

@pytest.mark.parametrize("bad,word", [
    ({"attempts": 0}, "greater than or equal to 1"),
    ({"on": ["reset"]}, "expected a status code or one of"),
    ({"on": [200]}, "4xx or 5xx"),
    ({"backoff": {"base": "2s", "max": "1s"}}, "max must not be shorter than base"),
    ({"budget_percent": 150}, "less than or equal to 100"),
    ({"max_replay_body": "lots"}, "invalid size"),
    ({"idempotency_header": "Bad Header"}, "not a valid header name"),
    ({"budget_window": 0}, "budget_window"),
])
def test_config_rejects(bad, word):
    with pytest.raises(ValidationError) as e:
        Config(**bad)
    assert word in str(e.value)


def test_config_defaults():
    c = Config()
    assert c.attempts == 3 and (c.backoff.base, c.backoff.max) == (0.1, 2.0)
    assert c.on == ["connect_error", "timeout", 502, 503, 504, 429]
    assert c.max_replay_body == 1024 * 1024 and c.budget_percent == 20
    assert c.idempotency_header == "Idempotency-Key" and not c.add_idempotency_key


def test_retry_after_forms():
    now = time.time()
    assert retry_after("3", now) == 3.0
    assert retry_after(None, now) is None
    assert retry_after("soon", now) is None
    d = retry_after(formatdate(now + 10, usegmt=True), now)
    assert d is not None and 9 <= d <= 10
    assert retry_after(formatdate(now - 10, usegmt=True), now) == 0.0


def test_budget_allows_percent_of_requests_plus_floor():
    b = RetryBudget(20, 0, 10.0)
    allowed = 0
    for i in range(20):
        b.request(100.0 + i * 0.01)
        allowed += b.withdraw(100.0 + i * 0.01)
    assert allowed == 4
    b2 = RetryBudget(0, 2, 1.0)
    b2.request(0.0)
    assert [b2.withdraw(0.0) for _ in range(3)] == [True, True, False]
    assert b2.withdraw(1.5)  # the window slid past the spent retries


async def test_dropped_response_is_closed():
    released = []

    async def always_503(ex):
        return ProxyResponse(503, body=b"x", release=released.append)

    from prometheus_client import CollectorRegistry, Counter
    counter = Counter("t_retries", "t", ["route", "reason"], registry=CollectorRegistry())
    f = RetryFilter("r", Config(backoff={"base": 0, "max": 0}), counter)
    ex = Exchange(None, "GET", "/", "", CIMultiDict(), request_id="r", started=0.0, max_body=1024)  # type: ignore[arg-type]
    resp = await f.handle(ex, always_503)
    assert resp.status == 503
    assert released == [False, False]  # two dropped tries, closed (not reused)
    assert ex.response_headers == [("X-Sidecar-Attempts", "3")]


# ---- end to end ---------------------------------------------------------------

async def test_fails_twice_then_succeeds(sidecar_factory, upstream, client):
    upstream.responder = script(503, 502, 200)
    sc = await sidecar_factory({"up": policy(upstream.url, FAST)})
    code, headers, body = await call(client, "GET", f"{sc.url}/up/x")
    assert code == 200 and body == b"try 3: 200"
    assert headers["X-Sidecar-Attempts"] == "3"
    assert len(upstream.seen) == 3
    assert await metric(client, sc, "503") == 1 and await metric(client, sc, "502") == 1
    line = (await sc.wait_access_lines(1))[-1]
    assert line["attempts"] == 3 and line["status"] == 200


async def test_gives_up_after_attempts_with_the_last_answer(sidecar_factory, upstream, client):
    upstream.responder = script(503)
    sc = await sidecar_factory({"up": policy(upstream.url, "attempts = 4\n" + FAST)})
    code, headers, body = await call(client, "GET", f"{sc.url}/up/")
    assert code == 503 and body == b"try 4: 503" and headers["X-Sidecar-Attempts"] == "4"
    assert len(upstream.seen) == 4
    line = (await sc.wait_access_lines(1))[-1]
    assert line["decisions"]["retry"] == {"attempts": 4, "gave_up": "attempts", "last": "503"}


async def test_statuses_not_listed_are_not_retried(sidecar_factory, upstream, client):
    upstream.responder = script(500)
    sc = await sidecar_factory({"up": policy(upstream.url, FAST)})
    code, headers, _ = await call(client, "GET", f"{sc.url}/up/")
    assert code == 500 and headers["X-Sidecar-Attempts"] == "1"
    assert len(upstream.seen) == 1


async def test_post_without_key_is_sent_once(sidecar_factory, upstream, client):
    upstream.responder = script(503, 200)
    sc = await sidecar_factory({"up": policy(upstream.url, FAST)})
    code, headers, _ = await call(client, "POST", f"{sc.url}/up/charges", data=b"amount=1")
    assert code == 503 and headers["X-Sidecar-Attempts"] == "1"
    assert len(upstream.seen) == 1
    assert "Idempotency-Key" not in upstream.seen[0].headers


async def test_post_with_key_is_retried_with_the_same_body(sidecar_factory, upstream, client):
    upstream.responder = script(503, 503, 201)
    sc = await sidecar_factory({"up": policy(upstream.url, FAST)})
    code, _, _ = await call(client, "POST", f"{sc.url}/up/charges", data=b"amount=1",
                            headers={"Idempotency-Key": "k-1"})
    assert code == 201
    assert [s.body for s in upstream.seen] == [b"amount=1"] * 3
    assert [s.headers["Idempotency-Key"] for s in upstream.seen] == ["k-1"] * 3


async def test_add_idempotency_key_makes_posts_retryable_with_one_key(sidecar_factory, upstream, client):
    upstream.responder = script(502, 200)
    sc = await sidecar_factory({"up": policy(upstream.url, "add_idempotency_key = true\n" + FAST)})
    code, headers, _ = await call(client, "POST", f"{sc.url}/up/charges", data=b"a=1")
    assert code == 200 and headers["X-Sidecar-Attempts"] == "2"
    keys = [s.headers.get("Idempotency-Key") for s in upstream.seen]
    assert len(keys) == 2 and keys[0] and keys[0] == keys[1]
    # A key the service sent is kept as it is.
    upstream.responder = script(200)
    await call(client, "POST", f"{sc.url}/up/charges", data=b"a=1", headers={"Idempotency-Key": "mine"})
    assert upstream.seen[-1].headers["Idempotency-Key"] == "mine"
    # PATCH is not given a key, so it is not retried.
    upstream.responder = script(502, 200)
    n = len(upstream.seen)
    assert (await call(client, "PATCH", f"{sc.url}/up/c", data=b"x"))[0] == 502
    assert len(upstream.seen) == n + 1


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_larger_than_max_replay_body_is_sent_once_whole(sidecar_factory, upstream, client, chunked):
    upstream.responder = script(503, 200)
    sc = await sidecar_factory({"up": policy(upstream.url, 'max_replay_body = "1KB"\n' + FAST)})
    payload = bytes(range(256)) * 40  # 10 KiB

    async def gen():
        for i in range(0, len(payload), 1000):
            yield payload[i:i + 1000]

    data = gen() if chunked else payload
    code, headers, _ = await call(client, "PUT", f"{sc.url}/up/blob", data=data)
    assert code == 503 and headers["X-Sidecar-Attempts"] == "1"
    assert len(upstream.seen) == 1 and upstream.seen[0].body == payload
    assert (await sc.wait_access_lines(1))[-1]["decisions"]["retry"] == "body_too_large_to_replay"


async def test_chunked_body_within_max_replay_body_is_replayed(sidecar_factory, upstream, client):
    upstream.responder = script(503, 200)
    sc = await sidecar_factory({"up": policy(upstream.url, 'max_replay_body = "64KB"\n' + FAST)})

    async def gen():
        for _ in range(10):
            yield b"x" * 1000

    code, headers, _ = await call(client, "PUT", f"{sc.url}/up/blob", data=gen())
    assert code == 200 and headers["X-Sidecar-Attempts"] == "2"
    assert [len(s.body) for s in upstream.seen] == [10000, 10000]


async def test_hanging_upstream_is_retried_per_try(sidecar_factory, upstream, client):
    upstream.responder = script("hang", "hang", 200)
    sc = await sidecar_factory({"up": policy(upstream.url, 'per_try_timeout = "100ms"\n' + FAST,
                                             extra='[timeouts]\ntotal = "5s"')})
    t0 = time.monotonic()
    code, headers, _ = await call(client, "GET", f"{sc.url}/up/")
    assert code == 200 and headers["X-Sidecar-Attempts"] == "3"
    assert len(upstream.seen) == 3
    # Far below the 5 s total: each try was cut at 100 ms (generous for a loaded CI box).
    assert time.monotonic() - t0 < 4
    assert await metric(client, sc, "timeout") == 2


async def test_deadline_bounds_the_whole_exchange(sidecar_factory, upstream, client):
    upstream.responder = script("hang")
    # Ten tries of 500 ms would take 5 s; the 1.3 s deadline allows three
    # (500 + 500 + the 300 left). Scaled so a loaded machine keeps the contrast.
    sc = await sidecar_factory({"up": policy(upstream.url, 'attempts = 10\nper_try_timeout = "500ms"\n' + FAST,
                                             extra='[timeouts]\ntotal = "1300ms"')})
    t0 = time.monotonic()
    code, headers, _ = await call(client, "GET", f"{sc.url}/up/")
    took = time.monotonic() - t0
    assert code == 504 and headers["X-Sidecar-Error"] == "upstream_timeout"
    assert took < 4
    assert 2 <= len(upstream.seen) <= 3
    assert int(headers["X-Sidecar-Attempts"]) == len(upstream.seen)


async def test_reset_connection_is_retried(sidecar_factory, upstream, client):
    upstream.responder = script("reset", 200)
    sc = await sidecar_factory({"up": policy(upstream.url, FAST)})
    code, headers, _ = await call(client, "GET", f"{sc.url}/up/")
    assert code == 200 and headers["X-Sidecar-Attempts"] == "2"
    assert len(upstream.seen) == 2
    assert await metric(client, sc, "connect_error") == 1


async def test_connect_error_not_listed_is_not_retried(sidecar_factory, client):
    dead = f"http://127.0.0.1:{free_port()}"
    sc = await sidecar_factory({"up": policy(dead, 'on = [503]\n' + FAST)})
    code, headers, _ = await call(client, "GET", f"{sc.url}/up/")
    assert code == 502 and headers["X-Sidecar-Attempts"] == "1"


async def test_upstream_that_comes_up_later_is_reached(sidecar_factory, client):
    port = free_port()
    sc = await sidecar_factory({"up": policy(f"http://127.0.0.1:{port}",
                                             'attempts = 5\nbackoff = { base = "200ms", max = "200ms" }')})
    task = asyncio.create_task(call(client, "GET", f"{sc.url}/up/"))
    # The upstream comes up once the first try was refused (a fixed sleep
    # raced a loaded machine: the first try could come after it).
    retries = retries_counter(sc.runtime.metrics)
    await wait_for(lambda: sum(s.value for m in retries.collect() for s in m.samples
                               if s.name.endswith("_total")) >= 1, timeout=10)
    up = FakeUpstream()
    app_site = await _start_on(up, port)
    try:
        code, headers, _ = await task
        assert code == 200
        assert int(headers["X-Sidecar-Attempts"]) >= 2
        assert len(up.seen) == 1  # the earlier tries never connected
    finally:
        await app_site.cleanup()


async def _start_on(up: FakeUpstream, port: int) -> web.AppRunner:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", up._handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def test_retry_after_seconds_is_honoured_and_capped(sidecar_factory, upstream, client):
    upstream.responder = script((429, {"Retry-After": "3"}), 200)
    sc = await sidecar_factory({"up": policy(upstream.url, 'backoff = { base = "1ms", max = "300ms" }')})
    t0 = time.monotonic()
    code, _, _ = await call(client, "GET", f"{sc.url}/up/")
    took = time.monotonic() - t0
    assert code == 200 and len(upstream.seen) == 2
    assert 0.3 <= took < 2.5  # waited the cap, not 3 s and not the 1 ms backoff


async def test_retry_after_date_is_honoured(sidecar_factory, upstream, client):
    upstream.responder = script((503, {"Retry-After": formatdate(time.time() + 0.9, usegmt=True)}), 200)
    sc = await sidecar_factory({"up": policy(upstream.url, 'backoff = { base = "1ms", max = "10s" }')})
    t0 = time.monotonic()
    code, _, _ = await call(client, "GET", f"{sc.url}/up/")
    # An HTTP date has one-second resolution: the wait is 0-0.9 s, never the 10 s cap.
    assert code == 200 and time.monotonic() - t0 < 5
    assert len(upstream.seen) == 2


async def test_retry_after_past_the_deadline_gives_up_at_once(sidecar_factory, upstream, client):
    upstream.responder = script((503, {"Retry-After": "5"}), 200)
    sc = await sidecar_factory({"up": policy(upstream.url, 'backoff = { base = "1ms", max = "10s" }',
                                             extra='[timeouts]\ntotal = "3s"')})
    t0 = time.monotonic()
    code, headers, _ = await call(client, "GET", f"{sc.url}/up/")
    assert code == 503 and headers["Retry-After"] == "5"
    assert time.monotonic() - t0 < 2  # not the 3 s deadline, not the 5 s asked
    assert len(upstream.seen) == 1
    assert (await sc.wait_access_lines(1))[-1]["decisions"]["retry"]["gave_up"] == "deadline"


async def test_retry_budget_under_sustained_failure(sidecar_factory, upstream, client):
    upstream.responder = script(503)
    sc = await sidecar_factory({"up": policy(
        upstream.url, 'budget_percent = 20\nbudget_min_retries = 0\nbudget_window = "60s"\n' + FAST)})
    for _ in range(20):
        assert (await call(client, "GET", f"{sc.url}/up/"))[0] == 503
    # 20 requests, 20% budget: 4 retries, not the 40 that attempts = 3 would send.
    assert len(upstream.seen) == 24
    assert await metric(client, sc, "503") == 4
    decisions = [line["decisions"]["retry"] for line in await sc.wait_access_lines(20)]
    assert {d["gave_up"] for d in decisions} == {"budget"}
    assert sorted(d["attempts"] for d in decisions) == [1] * 16 + [2] * 4


async def test_concurrent_failures_share_the_budget(sidecar_factory, upstream, client):
    upstream.responder = script(503)
    sc = await sidecar_factory({"up": policy(
        upstream.url, 'attempts = 5\nbudget_percent = 10\nbudget_min_retries = 2\n' + FAST)})
    results = await asyncio.gather(*[call(client, "GET", f"{sc.url}/up/") for _ in range(30)])
    assert all(r[0] == 503 for r in results)
    # At most 2 + 10% of 30 = 5 retries over the 30 requests.
    assert 30 < len(upstream.seen) <= 35


async def test_client_sees_no_bytes_from_failed_tries(sidecar_factory, upstream, client):
    upstream.responder = script((503, {"X-Try": "1"}), (200, {"X-Try": "2"}))
    sc = await sidecar_factory({"up": policy(upstream.url, FAST)})
    async with client.get(f"{sc.url}/up/") as r:
        assert r.headers["X-Try"] == "2" and await r.read() == b"try 2: 200"


async def test_attempts_one_never_retries(sidecar_factory, upstream, client):
    upstream.responder = script(503, 200)
    sc = await sidecar_factory({"up": policy(upstream.url, "attempts = 1")})
    code, headers, _ = await call(client, "GET", f"{sc.url}/up/")
    assert code == 503 and headers["X-Sidecar-Attempts"] == "1"
    assert len(upstream.seen) == 1


async def test_breaker_counts_every_try_and_stops_retries_when_open(sidecar_factory, upstream, client):
    upstream.responder = script(503)
    sc = await sidecar_factory({"up": f'route = "/up"\nupstream = "{upstream.url}"\n'
                                      f'[retry]\nattempts = 5\n{FAST}\n'
                                      '[circuit_breaker]\nfailure_threshold = 3\nrecovery_timeout = "30s"\n'})
    code, headers, _ = await call(client, "GET", f"{sc.url}/up/")
    # Three tries open the circuit; the fourth is refused at once and not retried.
    assert code == 503 and headers["X-Sidecar-Error"] == "circuit_open"
    assert headers["X-Sidecar-Attempts"] == "4"
    assert len(upstream.seen) == 3


async def test_client_disconnect_stops_retrying(sidecar_factory, upstream, client):
    upstream.responder = script((503, {"Retry-After": "1"}))
    sc = await sidecar_factory({"up": policy(upstream.url, 'attempts = 10\nbackoff = { base = "1s", max = "1s" }')})
    with pytest.raises(asyncio.TimeoutError):
        async with client.get(f"{sc.url}/up/", timeout=aiohttp.ClientTimeout(total=0.2)):
            pass
    # The sidecar saw the disconnect (499) while waiting to retry, and stopped.
    await wait_for(lambda: any(line["status"] == 499 for line in sc.access_lines()))
    assert sc.access_lines()[-1]["error"] == "client_closed"
    assert len(upstream.seen) == 1


async def test_without_retry_a_reset_request_is_sent_once(sidecar_factory, upstream, client):
    # aiohttp's own silent resend on a dropped connection is switched off:
    # retries happen only under the retry plugin's policy and budget.
    upstream.responder = script("reset", 200)
    sc = await sidecar_factory({"up": f'route = "/up"\nupstream = "{upstream.url}"\n'})
    code, headers, _ = await call(client, "GET", f"{sc.url}/up/")
    assert code == 502 and headers["X-Sidecar-Error"] == "upstream_unavailable"
    assert len(upstream.seen) == 1
