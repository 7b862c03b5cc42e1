"""Durable webhook delivery: queue, retries, dead letter, crash recovery, Redis Streams."""

from __future__ import annotations

import asyncio
import signal
import sqlite3

import orjson
import pytest
import stripe
from aiohttp import web

from plugins.webhook.service import backoff
from tests.support.inbound import inbound_config, inbound_url, webhook_policy
from tests.support.sidecar import SidecarProcess, free_port, write_config
from tests.support.upstream import FakeUpstream, wait_for

SECRET = "whsec_delivery_test"
FAST_RETRY = "{ attempts = 50, base = \"20ms\", max = \"100ms\" }"


def stripe_policy(retry: str = FAST_RETRY, **extra: object) -> str:
    return webhook_policy("/webhooks/stripe", "stripe", ["env:WH_SECRET"], forward_to="/hooks/stripe",
                          raw=f"retry = {retry}", **extra)


def signed(event_id: str) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps({"id": event_id, "type": "charge.succeeded", "data": {}})
    return body, {"Stripe-Signature": stripe.WebhookSignature.generate_signature_header(body.decode(), SECRET),
                  "Content-Type": "application/json"}


@pytest.fixture(autouse=True)
def _secret(monkeypatch):
    monkeypatch.setenv("WH_SECRET", SECRET)


async def send(client, url: str, event_id: str) -> tuple[int, dict[str, str]]:
    body, headers = signed(event_id)
    async with client.post(url + "/webhooks/stripe", data=body, headers=headers) as r:
        await r.read()
        return r.status, dict(r.headers)


def delivered_ids(up: FakeUpstream) -> list[str]:
    return [orjson.loads(s.body)["id"] for s in up.seen if s.headers.get("X-Sidecar-Delivered") == "yes"]


def scripted(state: dict) -> object:
    """A service that answers state["status"]; marks the requests it accepted."""

    async def respond(request: web.Request, seen) -> web.StreamResponse:
        status = state["status"]
        if 200 <= status < 300:
            seen.headers["X-Sidecar-Delivered"] = "yes"
        return web.Response(status=status)

    return respond


async def admin_events(client, sc, **query: str) -> list[dict]:
    async with client.get(sc.admin + "/admin/webhooks/events", params=query) as r:
        assert r.status == 200
        return (await r.json())["events"]


async def test_durable_202_then_delivered_with_event_headers(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"stripe": stripe_policy()}, inbound_config(upstream.url))
    status, headers = await send(client, inbound_url(sc), "evt_a")
    assert status == 202
    event_id = headers["X-Sidecar-Event-Id"]
    await wait_for(lambda: len(upstream.seen) == 1)
    seen = upstream.seen[0]
    assert seen.path_qs == "/hooks/stripe"
    assert seen.headers["X-Sidecar-Event-Id"] == event_id
    assert seen.headers["X-Sidecar-Attempt"] == "1"
    assert seen.body == signed("evt_a")[0]
    assert "Stripe-Signature" in seen.headers
    await wait_for(lambda: sc.runtime.services["webhook"].m.delivered.labels("stripe")._value.get() == 1)
    async with client.get(f"{sc.admin}/admin/webhooks/events/{event_id}") as r:
        detail = await r.json()
    assert detail["status"] == "delivered" and detail["provider_id"] == "evt_a"
    assert orjson.loads(detail["body"])["id"] == "evt_a"
    assert [e["id"] for e in await admin_events(client, sc, status="delivered", source="stripe")] == [event_id]
    assert await admin_events(client, sc, status="pending") == []
    # The queue is a WAL-mode SQLite file under data_dir, relative to config.toml.
    db = sqlite3.connect(sc.dir / "data" / "webhooks.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    import time

    assert await svc_of(sc).queue.prune(time.time() - 3600) == 0
    assert await svc_of(sc).queue.prune(time.time() + 1) == 1
    assert await admin_events(client, sc) == []


def svc_of(sc):
    return sc.runtime.services["webhook"]


async def test_service_down_then_back_every_event_once_in_order(sidecar_factory, upstream, client):
    state = {"status": 503}
    upstream.responder = scripted(state)
    sc = await sidecar_factory({"stripe": stripe_policy()}, inbound_config(upstream.url))
    url = inbound_url(sc)
    sent = [f"evt_{i}" for i in range(8)]
    for e in sent:
        assert (await send(client, url, e))[0] == 202
    svc = sc.runtime.services["webhook"]
    await wait_for(lambda: svc.m.retried.labels("stripe")._value.get() >= 3)
    assert delivered_ids(upstream) == []
    state["status"] = 200
    await wait_for(lambda: len(delivered_ids(upstream)) == len(sent))
    await wait_for(lambda: svc.m.delivered.labels("stripe")._value.get() == len(sent))
    assert delivered_ids(upstream) == sent
    # While down, only the head of the line was tried: order is kept.
    assert {orjson.loads(s.body)["id"] for s in upstream.seen if s.headers.get("X-Sidecar-Delivered") != "yes"} == {"evt_0"}
    attempts = [int(s.headers["X-Sidecar-Attempt"]) for s in upstream.seen]
    assert attempts[0] == 1 and max(attempts) >= 4


async def test_dead_letter_after_attempts_then_manual_retry(sidecar_factory, upstream, client):
    state = {"status": 500}
    upstream.responder = scripted(state)
    sc = await sidecar_factory({"stripe": stripe_policy(retry='{ attempts = 3, base = "10ms", max = "20ms" }')},
                               inbound_config(upstream.url))
    url = inbound_url(sc)
    _, h = await send(client, url, "evt_dead")
    event_id = h["X-Sidecar-Event-Id"]
    await wait_for(lambda: len(upstream.seen) == 3)
    dead = await _wait_status(client, sc, event_id, "dead")
    assert dead["attempts"] == 3 and dead["last_status"] == 500
    # Dead events do not block the source: the next one is delivered.
    state["status"] = 200
    await send(client, url, "evt_next")
    await wait_for(lambda: delivered_ids(upstream) == ["evt_next"])
    async with client.get(sc.admin + "/metrics") as r:
        assert 'sidecar_webhook_dead_total{source="stripe"} 1.0' in await r.text()
    async with client.post(f"{sc.admin}/admin/webhooks/events/{event_id}/retry") as r:
        assert r.status == 200
    await wait_for(lambda: delivered_ids(upstream) == ["evt_next", "evt_dead"])
    assert (await _wait_status(client, sc, event_id, "delivered"))["attempts"] == 1
    async with client.post(f"{sc.admin}/admin/webhooks/events/{event_id}/retry") as r:
        assert r.status == 409
    async with client.post(f"{sc.admin}/admin/webhooks/events/evt_nope/retry") as r:
        assert r.status == 404
    async with client.get(f"{sc.admin}/admin/webhooks/events", params={"status": "bogus"}) as r:
        assert r.status == 400


async def _wait_status(client, sc, event_id: str, status: str) -> dict:
    for _ in range(250):
        async with client.get(f"{sc.admin}/admin/webhooks/events/{event_id}") as r:
            detail = await r.json()
        if detail["status"] == status:
            return detail
        await asyncio.sleep(0.02)
    raise AssertionError(f"event never became {status}: {detail}")


async def test_client_error_from_service_is_dead_at_once(sidecar_factory, upstream, client):
    upstream.responder = scripted({"status": 422})
    sc = await sidecar_factory({"stripe": stripe_policy()}, inbound_config(upstream.url))
    _, h = await send(client, inbound_url(sc), "evt_422")
    detail = await _wait_status(client, sc, h["X-Sidecar-Event-Id"], "dead")
    assert detail["attempts"] == 1 and len(upstream.seen) == 1


async def test_duplicate_of_a_queued_event(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"stripe": stripe_policy()}, inbound_config(upstream.url))
    url = inbound_url(sc)
    assert (await send(client, url, "evt_same"))[0] == 202
    status, headers = await send(client, url, "evt_same")
    assert status == 200 and headers["X-Sidecar-Duplicate"] == "1"
    await wait_for(lambda: len(upstream.seen) == 1)
    assert len(await admin_events(client, sc)) == 1


def test_backoff_grows_with_jitter_and_is_capped():
    for attempt in range(1, 12):
        d = backoff(attempt, 1.0, 60.0)
        cap = min(60.0, 2 ** (attempt - 1))
        assert cap / 2 <= d <= cap
    assert len({backoff(5, 1.0, 60.0) for _ in range(20)}) > 1


async def test_kill_9_after_202_then_restart_delivers(tmp_path, client):
    service_port = free_port()
    inbound_port = free_port()
    out_port, admin_port = free_port(), free_port()
    path = write_config(tmp_path, {"stripe": stripe_policy(retry='{ attempts = 100, base = "50ms", max = "100ms" }')},
                        inbound_config(f"http://127.0.0.1:{service_port}", listen=f"127.0.0.1:{inbound_port}"),
                        outbound_port=out_port, admin_port=admin_port)
    proc = SidecarProcess(path, out_port, admin_port).start()
    service: FakeUpstream | None = None
    try:
        await wait_for(lambda: _listening(inbound_port), timeout=10)
        status, headers = await send(client, f"http://127.0.0.1:{inbound_port}", "evt_crash")
        assert status == 202
        proc.signal(signal.SIGKILL)
        proc.wait(10)
        service = await FakeUpstream().start(port=service_port)
        proc = SidecarProcess(path, out_port, admin_port).start()
        await wait_for(lambda: len(service.seen) >= 1, timeout=15)
        seen = service.seen[0]
        assert orjson.loads(seen.body)["id"] == "evt_crash"
        assert seen.headers["X-Sidecar-Event-Id"] == headers["X-Sidecar-Event-Id"]

        class _Sc:
            admin = proc.admin

        await _wait_status(client, _Sc, headers["X-Sidecar-Event-Id"], "delivered")
        assert len(service.seen) == 1
    finally:
        proc.kill()
        if service is not None:
            await service.stop()


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# ---- Redis Streams ---------------------------------------------------------------

def redis_config(service_url: str, redis_url: str) -> str:
    return inbound_config(service_url, extra=f"""
        [state]
        backend = "redis"
        url = "{redis_url}"
        """)


async def test_redis_stream_shared_by_two_sidecars_delivers_each_event_once_in_order(
        sidecar_factory, upstream, client, redis_url):
    upstream.responder = scripted({"status": 200})
    a = await sidecar_factory({"stripe": stripe_policy()}, redis_config(upstream.url, redis_url))
    b = await sidecar_factory({"stripe": stripe_policy()}, redis_config(upstream.url, redis_url))
    sent = [f"evt_r{i}" for i in range(12)]
    for i, e in enumerate(sent):
        status, _ = await send(client, inbound_url(a if i % 2 == 0 else b), e)
        assert status == 202
    await wait_for(lambda: len(upstream.seen) >= len(sent), timeout=10)
    for sc in (a, b):
        await wait_for(lambda sc=sc: sc.runtime.services["webhook"].queue is not None)
    svc = a.runtime.services["webhook"]

    async def settled() -> bool:
        depth, _ = await svc.queue.stats("stripe")
        return depth == 0

    for _ in range(250):
        if await settled():
            break
        await asyncio.sleep(0.02)
    assert await settled()
    assert delivered_ids(upstream) == sent
    events = await admin_events(client, b, source="stripe")
    assert len(events) == len(sent) and {e["status"] for e in events} == {"delivered"}
    # A duplicate sent to the other sidecar is caught by the shared state backend.
    status, headers = await send(client, inbound_url(b), "evt_r0")
    assert status == 200 and headers["X-Sidecar-Duplicate"] == "1"


async def test_redis_stream_survives_a_sidecar_stopping_mid_backlog(sidecar_factory, upstream, client, redis_url):
    state = {"status": 503}
    upstream.responder = scripted(state)
    a = await sidecar_factory({"stripe": stripe_policy()}, redis_config(upstream.url, redis_url))
    for e in ("evt_s0", "evt_s1", "evt_s2"):
        assert (await send(client, inbound_url(a), e))[0] == 202
    await wait_for(lambda: len(upstream.seen) >= 2)
    await a.sidecar.stop()  # releases its lease, leaves evt_s0 pending in its PEL
    state["status"] = 200
    b = await sidecar_factory({"stripe": stripe_policy()}, redis_config(upstream.url, redis_url))
    await wait_for(lambda: len(delivered_ids(upstream)) == 3, timeout=10)
    assert delivered_ids(upstream) == ["evt_s0", "evt_s1", "evt_s2"]
    assert b.runtime.services["webhook"].queue.kind == "redis"


async def test_publish_to_redis_stream(sidecar_factory, upstream, client, redis_url):
    import redis.asyncio as aioredis

    sc = await sidecar_factory({"stripe": stripe_policy(publish=True)}, redis_config(upstream.url, redis_url))
    _, h = await send(client, inbound_url(sc), "evt_pub")
    r = aioredis.from_url(redis_url)
    try:
        entries: list = []

        async def poll() -> None:
            for _ in range(250):
                entries[:] = await r.xrange("webhook.stripe.charge.succeeded")
                if entries:
                    return
                await asyncio.sleep(0.02)

        await poll()
        assert len(entries) == 1
        fields = entries[0][1]
        assert fields[b"id"].decode() == h["X-Sidecar-Event-Id"]
        assert orjson.loads(fields[b"body"])["id"] == "evt_pub"
    finally:
        await r.aclose()


async def test_prune_trims_delivered_history(sidecar_factory, upstream, client, redis_url, tmp_path):
    import time

    import redis.asyncio as aioredis

    upstream.responder = scripted({"status": 200})
    sc = await sidecar_factory({"stripe": stripe_policy()}, redis_config(upstream.url, redis_url))
    for e in ("evt_p0", "evt_p1"):
        await send(client, inbound_url(sc), e)
    await wait_for(lambda: len(delivered_ids(upstream)) == 2)
    svc = sc.runtime.services["webhook"]
    for _ in range(250):
        if (await svc.queue.stats("stripe"))[0] == 0:
            break
        await asyncio.sleep(0.02)
    assert await svc.queue.prune(time.time() + 1) == 2
    r = aioredis.from_url(redis_url)
    try:
        assert await r.xlen(svc.queue.stream("stripe")) <= 1
    finally:
        await r.aclose()
    assert await admin_events(client, sc) == []


async def test_redis_down_answers_503_so_the_provider_retries(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"stripe": stripe_policy()},
                               redis_config(upstream.url, f"redis://127.0.0.1:{free_port()}/0"))
    status, headers = await send(client, inbound_url(sc), "evt_noredis")
    assert status == 503 and headers["X-Sidecar-Error"] == "queue_unavailable"
    assert upstream.seen == []


async def test_webhook_added_by_reload_is_served_and_delivered(sidecar_factory, upstream, client):
    sc = await sidecar_factory({}, inbound_config(upstream.url))
    url = inbound_url(sc)
    async with client.post(url + "/webhooks/stripe", data=b"{}") as r:
        assert r.status == 404
    sc.write_policy("stripe", stripe_policy())
    async with client.post(sc.admin + "/admin/reload") as r:
        assert r.status == 200
    assert (await send(client, url, "evt_reloaded"))[0] == 202
    await wait_for(lambda: len(upstream.seen) == 1)
    # Removing the policy removes the endpoint.
    (sc.dir / "policies" / "stripe.toml").unlink()
    async with client.post(sc.admin + "/admin/reload") as r:
        assert r.status == 200
    assert (await send(client, url, "evt_gone"))[0] == 404


async def test_redelivery_after_a_crash_mid_delivery_says_attempt_2_sqlite(tmp_path, client):
    await _crash_mid_delivery(tmp_path, client, "")


async def test_redelivery_after_a_crash_mid_delivery_says_attempt_2_redis(tmp_path, client, redis_url):
    await _crash_mid_delivery(tmp_path, client, f'\n[state]\nbackend = "redis"\nurl = "{redis_url}"\n')


async def _crash_mid_delivery(tmp_path, client, extra: str) -> None:
    """Issue 11 item 8: the attempt is stored before the service sees it, so
    the delivery that follows a kill -9 mid-delivery carries attempt 2."""
    service_port, inbound_port = free_port(), free_port()
    out_port, admin_port = free_port(), free_port()
    path = write_config(tmp_path, {"stripe": stripe_policy(retry='{ attempts = 10, base = "50ms", max = "100ms" }')},
                        inbound_config(f"http://127.0.0.1:{service_port}", listen=f"127.0.0.1:{inbound_port}",
                                       extra=extra),
                        outbound_port=out_port, admin_port=admin_port)
    first_arrived = asyncio.Event()

    async def hang_first(req: web.Request, seen) -> web.StreamResponse:
        if len(service.seen) == 1:
            first_arrived.set()
            await asyncio.sleep(20)  # the sidecar is killed while it waits for this answer
        return web.Response(status=200)

    service = await FakeUpstream(hang_first).start(port=service_port)
    proc = SidecarProcess(path, out_port, admin_port).start()
    try:
        await wait_for(lambda: _listening(inbound_port), timeout=10)
        status, headers = await send(client, f"http://127.0.0.1:{inbound_port}", "evt_mid")
        assert status == 202
        await asyncio.wait_for(first_arrived.wait(), 10)
        assert service.seen[0].headers["X-Sidecar-Attempt"] == "1"
        proc.signal(signal.SIGKILL)
        proc.wait(10)
        proc = SidecarProcess(path, out_port, admin_port).start()
        # Redis: the dead sidecar's 5 s lease expires first, then the new one claims the event.
        await wait_for(lambda: len(service.seen) >= 2, timeout=20)
        again = service.seen[1]
        assert again.headers["X-Sidecar-Event-Id"] == headers["X-Sidecar-Event-Id"]
        assert again.headers["X-Sidecar-Attempt"] == "2"

        class _Sc:
            admin = proc.admin

        await _wait_status(client, _Sc, headers["X-Sidecar-Event-Id"], "delivered")
    finally:
        proc.kill()
        await service.stop()


async def test_provider_hanging_up_mid_commit_keeps_the_dedupe_claim(sidecar_factory, upstream, client):
    """The provider gives up while the event is being committed (a slow disk
    here: another writer holds the SQLite lock). The commit goes on and the
    event is stored, so the provider's retry of the same event must not be
    stored a second time (the claim follows the commit, not the hang-up)."""
    import time

    import aiohttp

    state = {"status": 503}        # keep the first event queued while we look
    upstream.responder = scripted(state)
    sc = await sidecar_factory({"stripe": stripe_policy()}, inbound_config(upstream.url))
    url = inbound_url(sc)
    assert (await send(client, url, "evt_warm"))[0] == 202   # the queue is open
    db = sqlite3.connect(sc.dir / "data" / "webhooks.sqlite3", isolation_level=None, timeout=10)
    db.execute("BEGIN IMMEDIATE")  # writers wait (busy timeout) until we let go
    try:
        body, headers = signed("evt_slow")
        with pytest.raises(asyncio.TimeoutError):
            async with client.post(url + "/webhooks/stripe", data=body, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=0.5)) as r:
                await r.read()
        # The sidecar saw the hang-up (its handler was cancelled: logged 499).
        end = time.monotonic() + 5
        while not [a for a in sc.access_lines() if a["status"] == 499]:
            assert time.monotonic() < end, sc.access_lines()
            await asyncio.sleep(0.02)
    finally:
        db.execute("COMMIT")
        db.close()
    await wait_for(lambda: svc_of(sc).m.received.labels("stripe")._value.get() == 2)
    end = time.monotonic() + 10
    while len(await admin_events(client, sc)) < 2:     # the commit went on
        assert time.monotonic() < end
        await asyncio.sleep(0.05)
    # The provider retries the event it never got an answer for.
    status, h = await send(client, url, "evt_slow")
    assert status in (200, 409), (status, h)
    events = await admin_events(client, sc)
    assert sorted(e["provider_id"] for e in events) == ["evt_slow", "evt_warm"], events


async def test_webhook_added_by_reload_without_an_inbound_listener_is_refused(sidecar_factory, upstream, client):
    """The inbound listener starts only when config.toml has [inbound] or a
    policy has [webhook] at start-up. A reload that adds the first webhook to
    a sidecar without it must say so (the set is refused, the old one keeps
    serving) instead of reporting success for a path nothing listens on."""
    sc = await sidecar_factory({"api": f'route = "/api"\nupstream = "{upstream.url}"\n'})
    assert "inbound" not in sc.sidecar.ports
    sc.write_policy("stripe", stripe_policy())
    async with client.post(sc.admin + "/admin/reload") as r:
        body = await r.text()
        assert r.status != 200, body
    assert "inbound listener" in body and "stripe.toml" in body, body
    async with client.get(sc.url + "/api/x") as r:      # the old set keeps serving
        assert r.status == 200
