"""Operating the sidecar: disabled routes, detailed health, /admin/config and
/admin/stats, the admin token, per-tenant cache figures, allowed_clients,
application logs and hashed identities. Real sockets throughout."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import textwrap
import time

import pytest
from aiohttp import web

from tests.support.sidecar import SidecarProcess, free_port, write_config
from tests.support.upstream import FakeUpstream


def policy(url: str, route: str = "/p", extra: str = "") -> str:
    return f'route = "{route}"\nupstream = "{url}"\n{extra}\n'


# ---- enabled = false -----------------------------------------------------------

async def test_disabled_route_answers_503_and_reloads_back_on(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": "enabled = false\n" + policy(upstream.url, extra='[retry]\nattempts = 2\n'),
                                "q": policy(upstream.url, "/q")})
    async with client.get(f"{sc.url}/p/x") as r:
        assert r.status == 503
        assert r.headers["X-Sidecar-Error"] == "route_disabled"
        body = await r.json()
    assert body["error"]["code"] == "route_disabled" and body["error"]["request_id"]
    assert upstream.seen == []
    async with client.get(f"{sc.url}/q/x") as r:
        assert r.status == 200
    async with client.get(f"{sc.admin}/admin/routes") as r:
        routes = {x["name"]: x for x in (await r.json())["routes"]}
    assert routes["p"]["enabled"] is False and routes["p"]["chain"] == []
    assert routes["q"]["enabled"] is True
    sc.write_policy("p", policy(upstream.url, extra='[retry]\nattempts = 2\n'))
    assert await sc.runtime.reload() == []
    async with client.get(f"{sc.url}/p/x") as r:
        assert r.status == 200
    lines = await sc.wait_access_lines(3)
    assert [(ln["status"], ln.get("error")) for ln in lines if ln["route"] == "p"] == [(503, "route_disabled"), (200, None)]


# ---- health --------------------------------------------------------------------

async def test_health_detailed_reports_each_part_and_the_worst(sidecar_factory, client):
    failing = await FakeUpstream().start()

    async def boom(request: web.Request, seen) -> web.Response:
        return web.Response(status=500)

    failing.responder = boom
    try:
        sc = await sidecar_factory({
            "p": policy(failing.url, extra="[circuit_breaker]\nfailure_threshold = 2\nrecovery_timeout = \"60s\"\n")})
        async with client.get(f"{sc.admin}/health/detailed") as r:
            assert r.status == 200
            body = await r.json()
        assert body["status"] == "ok"
        assert body["checks"]["state_backend"]["status"] == "ok"
        assert body["checks"]["policies"] == {"status": "ok", "latency_ms": None, "error": None, "routes": 1}
        up = body["upstreams"]["p"]
        assert up["status"] == "ok" and up["breaker"] == "closed" and up["url"] == failing.url
        for _ in range(2):
            async with client.get(f"{sc.url}/p/x") as r:
                assert r.status == 500
        async with client.get(f"{sc.url}/p/x") as r:
            assert r.headers["X-Sidecar-Error"] == "circuit_open"
        async with client.get(f"{sc.admin}/health/detailed") as r:
            assert r.status == 200     # degraded is still up
            body = await r.json()
        assert body["status"] == "degraded"
        assert body["upstreams"]["p"] == {**body["upstreams"]["p"], "status": "degraded",
                                          "breaker": "open", "error": "circuit breaker open"}
        assert body["upstreams"]["p"]["pool"]["created"] >= 1
        # a rejected reload degrades the policy part, naming the count
        sc.write_policy("bad", 'route = "/bad"\nupstream = "ftp://x"\n')
        assert await sc.runtime.reload()
        async with client.get(f"{sc.admin}/health/detailed") as r:
            pol = (await r.json())["checks"]["policies"]
        assert pol["status"] == "degraded" and pol["error"].startswith("last reload rejected (1 problem(s))")
        async with client.get(f"{sc.admin}/ready") as r:
            assert r.status == 200       # the previous set keeps serving
    finally:
        await failing.stop()


async def test_health_detailed_is_503_when_the_state_backend_is_down(sidecar_factory, upstream, client):
    port = free_port()
    sc = await sidecar_factory({"p": policy(upstream.url)},
                               f'[state]\nbackend = "redis"\nurl = "redis://:s3cretpw@127.0.0.1:{port}/0"\n')
    async with client.get(f"{sc.admin}/health/detailed") as r:
        assert r.status == 503
        body = await r.json()
    assert body["status"] == "down"
    assert body["checks"]["state_backend"]["status"] == "down"
    assert f"redis://:***@127.0.0.1:{port}/0" in body["checks"]["state_backend"]["error"]
    assert "s3cretpw" not in json.dumps(body)
    async with client.get(f"{sc.admin}/health") as r:
        assert r.status == 200        # liveness: the process is fine


async def test_health_checks_hook_adds_a_part(sidecar_factory, upstream, client, tmp_path, monkeypatch):
    (tmp_path / "health_hook_plugin.py").write_text(textwrap.dedent('''\
        from proxy.hookspecs import hookimpl

        @hookimpl
        def sidecar_health_checks(runtime):
            async def ledger():
                return {"status": "degraded", "latency_ms": 1.5, "error": "ledger lagging 30s"}
            return {"ledger": ledger}
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    sc = await sidecar_factory({"p": policy(upstream.url)}, sidecar='plugins = ["health_hook_plugin"]')
    async with client.get(f"{sc.admin}/health/detailed") as r:
        assert r.status == 200
        body = await r.json()
    assert body["checks"]["ledger"] == {"status": "degraded", "latency_ms": 1.5, "error": "ledger lagging 30s"}
    assert body["status"] == "degraded"


# ---- /admin/config and /admin/stats ---------------------------------------------

async def test_admin_config_version_and_last_reload(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": policy(upstream.url)})
    async with client.get(f"{sc.admin}/admin/config") as r:
        first = await r.json()
    assert len(first["version"]) == 16 and first["loaded_at"] <= time.time()
    assert first["last_reload"] is None
    assert [p["name"] for p in first["policies"]] == ["p"]
    sc.write_policy("q", 'route = "/q"\nupstream = "nope"\n')
    problems = await sc.runtime.reload()
    async with client.get(f"{sc.admin}/admin/config") as r:
        body = await r.json()
    assert body["version"] == first["version"]
    assert body["last_reload"]["ok"] is False and body["last_reload"]["problems"] == problems
    sc.write_policy("q", policy(upstream.url, "/q"))
    assert await sc.runtime.reload() == []
    async with client.get(f"{sc.admin}/admin/config") as r:
        body = await r.json()
    assert body["version"] != first["version"] and body["loaded_at"] > first["loaded_at"]
    assert body["last_reload"]["ok"] is True and body["last_reload"]["problems"] == []


async def test_admin_stats_counts_errors_and_p99(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": policy(upstream.url)})

    async def answer(request: web.Request, seen) -> web.Response:
        return web.Response(status=502 if request.path.endswith("/bad") else 200)

    upstream.responder = answer
    for path in ("/p/a", "/p/a", "/p/a", "/p/bad"):
        async with client.get(sc.url + path) as r:
            await r.read()
    await sc.wait_access_lines(4)
    async with client.get(f"{sc.admin}/admin/stats") as r:
        body = await r.json()
    p = body["routes"]["p"]
    assert p["requests"] == 4 and p["errors"] == 1 and p["statuses"] == {"200": 3, "502": 1}
    assert p["buckets"][-1] == ["+Inf", 4] and 0 < p["p99_ms"] < 5000


# ---- admin token ---------------------------------------------------------------

async def test_admin_token_guards_every_admin_endpoint(sidecar_factory, upstream, client, monkeypatch):
    monkeypatch.setenv("TEST_SIDECAR_ADMIN_TOKEN", "admintok-123")
    sc = await sidecar_factory({"p": policy(upstream.url, extra="[circuit_breaker]\n")},
                               admin='token = "env:TEST_SIDECAR_ADMIN_TOKEN"')
    for method, path in (("GET", "/admin/routes"), ("GET", "/admin/config"), ("POST", "/admin/reload"),
                         ("GET", "/admin/breakers"), ("POST", "/admin/breakers/p/reset"), ("GET", "/admin/stats"),
                         ("GET", "/admin/cache"), ("GET", "/admin/nope")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic admintok-123"}):
            async with client.request(method, sc.admin + path, headers=headers) as r:
                assert r.status == 401, (method, path, headers)
                assert r.headers["X-Sidecar-Error"] == "unauthorized"
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
    async with client.get(sc.admin + "/admin/routes", headers={"Authorization": "Bearer admintok-123"}) as r:
        assert r.status == 200
    for path in ("/health", "/health/detailed", "/ready", "/metrics", "/"):
        async with client.get(sc.admin + path) as r:
            assert r.status == 200, path
    monkeypatch.delenv("TEST_SIDECAR_ADMIN_TOKEN")
    await sc.runtime.reload()       # env: values are read at load and reload, not per request
    async with client.get(sc.admin + "/admin/routes", headers={"Authorization": "Bearer admintok-123"}) as r:
        assert r.status == 503      # fail closed, never "no token"
        assert r.headers["X-Sidecar-Error"] == "admin_token_unavailable"



async def test_admin_actions_refuse_a_cross_site_browser(sidecar_factory, upstream, client):
    """Without a token the admin listener trusts its position (loopback), but a
    page on another site open in the operator's browser can send it a form
    POST: an action (reload, breaker reset, webhook re-delivery, purge) from a
    foreign Origin is 403; curl (no Origin) and the dashboard (same origin) act."""
    sc = await sidecar_factory({"p": policy(upstream.url)})
    host = sc.admin.removeprefix("http://")
    async with client.post(f"{sc.admin}/admin/reload", headers={"Origin": "https://evil.example"}) as r:
        assert r.status == 403 and r.headers["X-Sidecar-Error"] == "cross_origin_refused"
    async with client.post(f"{sc.admin}/admin/reload", headers={"Sec-Fetch-Site": "cross-site"}) as r:
        assert r.status == 403
    async with client.post(f"{sc.admin}/admin/reload", headers={"Origin": "null"}) as r:
        assert r.status == 403      # a sandboxed frame or a file: page
    async with client.post(f"{sc.admin}/admin/reload", headers={"Origin": f"http://{host}"}) as r:
        assert r.status == 200
    async with client.post(f"{sc.admin}/admin/reload", headers={"Origin": "https://admin.example",
                                                               "Host": "admin.example"}) as r:
        assert r.status == 200      # the dashboard behind a TLS-terminating ingress
    async with client.post(f"{sc.admin}/admin/reload", headers={"Origin": f"http://{host}.evil.example"}) as r:
        assert r.status == 403
    async with client.post(f"{sc.admin}/admin/reload") as r:
        assert r.status == 200
    async with client.get(f"{sc.admin}/admin/routes", headers={"Origin": "https://evil.example"}) as r:
        assert r.status == 200      # reads are the browser's same-origin policy's to guard


def test_admin_token_must_be_a_reference(tmp_path):
    from proxy.cli import check

    path = write_config(tmp_path, {}, admin='token = "plain-token-xyz"')
    problems = check(str(path))
    assert problems == [f"{path}: admin.token: must be a secret reference (\"env:SIDECAR_ADMIN_TOKEN\", "
                        "file:/path or vault:path#key), never the token itself (got a value, not shown)"]


# ---- per-tenant cache figures ----------------------------------------------------

async def test_cache_figures_per_tenant(sidecar_factory, upstream, client):
    async def cacheable(request: web.Request, seen) -> web.Response:
        return web.Response(text="x", headers={"Cache-Control": "max-age=60"})

    upstream.responder = cacheable
    sc = await sidecar_factory({"p": policy(upstream.url, extra='[cache]\nttl = "60s"\n')})
    for tenant, path in (("a", "/p/1"), ("a", "/p/1"), ("a", "/p/1"), ("b", "/p/2")):
        async with client.get(sc.url + path, headers={"X-Tenant-ID": tenant}) as r:
            await r.read()
    async with client.get(sc.admin + "/admin/cache?tenant=a") as r:
        a = await r.json()
    assert a == {"tenant": "a", "tracked": True, "hits": 2, "misses": 1, "hit_rate": 0.6667,
                 "routes": {"p": {"hits": 2, "misses": 1, "bypass": 0, "stale": 0, "hit_rate": 0.6667}}}
    async with client.get(sc.admin + "/admin/cache?tenant=b") as r:
        b = await r.json()
    assert (b["hits"], b["misses"], b["hit_rate"]) == (0, 1, 0.0)
    async with client.get(sc.admin + "/admin/cache?tenant=nobody") as r:
        assert await r.json() == {"tenant": "nobody", "tracked": False, "hits": 0, "misses": 0,
                                  "hit_rate": None, "routes": {}}


def test_tenant_counts_keep_the_busiest():
    from proxy.tenants import TopCounts

    c = TopCounts(("hit", "miss"), cap=10)
    for i in range(10):
        for _ in range(100 + i):
            c.add(f"big{i}", "hit")
    for i in range(5000):
        c.add(f"once{i}", "miss")
    assert len(c.counts) <= 12
    assert {t for t, _ in c.top(10)} == {f"big{i}" for i in range(10)}
    assert c.get("big3") == {"hit": 103, "miss": 0}


# ---- allowed_clients -----------------------------------------------------------

async def test_allowed_clients_refuses_other_peers_loopback_included(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": policy(upstream.url)}, outbound='allowed_clients = ["10.0.0.0/8"]')
    async with client.get(f"{sc.url}/p/x") as r:
        assert r.status == 403
        assert r.headers["X-Sidecar-Error"] == "client_not_allowed"
        assert (await r.json())["error"]["code"] == "client_not_allowed"
    async with client.get(f"{sc.url}/nowhere") as r:
        assert r.status == 403       # before routing: nothing about the routes leaks
    assert upstream.seen == []
    sc2 = await sidecar_factory({"p": policy(upstream.url)},
                                outbound='allowed_clients = ["10.0.0.0/8", "127.0.0.1/32"]')
    async with client.get(f"{sc2.url}/p/x") as r:
        assert r.status == 200



@pytest.mark.parametrize("server", ["fast", "aiohttp"])
@pytest.mark.parametrize("hashed", [False, True])
async def test_requests_refused_before_routing_log_the_peer(sidecar_factory, upstream, client, monkeypatch,
                                                            server, hashed):
    """A 404 no_route and a 403 client_not_allowed have no Exchange, yet their
    access-log lines name the peer (hashed under hash_identifiers), so a
    refused client is traceable."""
    kw = {}
    expect = "127.0.0.1"
    if hashed:
        monkeypatch.setenv("TEST_LOG_HASH_KEY", "k3y-for-audit")
        kw["logging"] = 'hash_identifiers = true\nhash_key = "env:TEST_LOG_HASH_KEY"'
        expect = hmac.new(b"k3y-for-audit", b"127.0.0.1", hashlib.sha256).hexdigest()[:16]
    open_sc = await sidecar_factory({"p": policy(upstream.url)}, outbound=f'server = "{server}"', **kw)
    closed_sc = await sidecar_factory({"p": policy(upstream.url)},
                                      outbound=f'server = "{server}"\nallowed_clients = ["10.0.0.0/8"]', **kw)
    for sc, status, code in ((open_sc, 404, "no_route"), (closed_sc, 403, "client_not_allowed")):
        async with client.get(f"{sc.url}/nowhere/x") as r:
            assert r.status == status
            assert r.headers["X-Sidecar-Error"] == code
        [line] = await sc.wait_access_lines(1)
        assert line["status"] == status and line["route"] == ""
        assert line["client"] == expect, line
        if hashed:
            assert "127.0.0.1" not in json.dumps(line)
    # A 400 bad target (a dot segment) and, on the fast server, a head refused
    # at parse level (HTTP/1.1 without Host): sent raw, as clients would not.
    raws = [b"GET /p/../x HTTP/1.1\r\nHost: x\r\n\r\n"]
    if server == "fast":
        raws.append(b"GET /p/x HTTP/1.1\r\n\r\n")
    for n, raw in enumerate(raws, start=2):
        reader, writer = await asyncio.open_connection("127.0.0.1", open_sc.sidecar.ports["outbound"])
        writer.write(raw)
        assert (await reader.readline()).startswith(b"HTTP/1.1 400 ")
        writer.close()
        lines = await open_sc.wait_access_lines(n)
        assert lines[-1]["status"] == 400 and lines[-1]["client"] == expect, lines[-1]
    assert upstream.seen == []


async def test_allowed_clients_written_as_ipv4_mapped_match_ipv4_peers(tmp_path, upstream, client):
    """On a dual-stack listener ("[::]") an IPv4 peer is "::ffff:127.0.0.1"; an
    entry written that way (or as a mapped network) allows it, as the same
    entry in IPv4 form does."""
    from proxy.config import load_settings
    from proxy.server import Sidecar
    from tests.support.sidecar import RunningSidecar

    for n, listen, entry in ((1, "[::]:0", "::ffff:127.0.0.1"), (2, "0.0.0.0:0", "::ffff:127.0.0.0/104")):
        path = write_config(tmp_path / str(n), {"p": policy(upstream.url)},
                            outbound=f'allowed_clients = ["{entry}"]')
        path.write_text(path.read_text().replace('listen = "127.0.0.1:0"\nallowed_clients',
                                                 f'listen = "{listen}"\nallowed_clients', 1))
        sc = Sidecar(load_settings(path))
        await sc.start()
        try:
            async with client.get(f"{RunningSidecar(sc, path).url}/p/x") as r:
                assert r.status == 200, (listen, entry, r.headers.get("X-Sidecar-Error"))
        finally:
            await sc.stop()


def test_client_allow_list_rules():
    from proxy.clients import ClientAllowList, is_loopback

    allow = ClientAllowList(["10.0.0.0/8", "2001:db8::/32"])
    assert allow.allows("10.1.2.3") and allow.allows("::ffff:10.1.2.3") and allow.allows("2001:db8::1")
    assert not allow.allows("127.0.0.1") and not allow.allows("11.0.0.1") and not allow.allows(None)
    assert not allow.allows("garbage")
    mapped = ClientAllowList(["::ffff:10.0.0.0/104", "::ffff:192.0.2.7"])
    assert mapped.allows("10.1.2.3") and mapped.allows("::ffff:10.1.2.3") and mapped.allows("192.0.2.7")
    assert not mapped.allows("11.0.0.1") and not mapped.allows("::ffff:192.0.2.8")
    assert ClientAllowList(None).allows("203.0.113.9")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("10.0.0.1")


# ---- logs ----------------------------------------------------------------------

def _process(tmp_path, policies, config="", **kw) -> SidecarProcess:
    out_port, admin_port = free_port(), free_port()
    path = write_config(tmp_path, policies, config, outbound_port=out_port, admin_port=admin_port, **kw)
    return SidecarProcess(path, out_port, admin_port)


def test_application_logs_are_json_lines_with_a_startup_summary(tmp_path, upstream):
    redis_port = free_port()
    proc = _process(tmp_path, {"p": policy(upstream.url, extra='[auth]\ntype = "bearer"\n'
                                                                'secret = "env:TEST_UNSET_SECRET_XYZ"\n')},
                    f'[state]\nbackend = "redis"\nurl = "redis://:pw-do-not-log@127.0.0.1:{redis_port}/0"\n')
    proc.start()
    try:
        proc.signal()
        assert proc.wait() == 0
    finally:
        proc.kill()
    _, err = proc.output()
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert records, err
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    by_msg = {r["msg"]: r for r in records}
    listening = by_msg["listening"]
    assert listening["listeners"]["outbound"] == f"127.0.0.1:{proc.outbound_port}"
    assert listening["listeners"]["admin"] == f"127.0.0.1:{proc.admin_port}"
    route = by_msg[f"route /p -> {upstream.url}"]
    assert route["plugins"] == ["auth"] and route["enabled"] is True
    assert any(r["level"] == "warning" and "env:TEST_UNSET_SECRET_XYZ" in r["msg"] for r in records)
    [down] = [r for r in records if r["msg"].startswith("state backend unreachable")]
    assert down["level"] == "error"
    assert f"redis at redis://:***@127.0.0.1:{redis_port}/0" in down["msg"]
    assert "pw-do-not-log" not in err



def test_a_listener_that_cannot_bind_is_one_json_error_line_not_a_traceback(tmp_path, upstream):
    """A port in use: the process exits non-zero and says which listener,
    as a JSON log line like every other, not a Python traceback."""
    import os
    import socket
    import subprocess
    import sys

    from tests.support.sidecar import REPO

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(tmp_path, {"p": policy(upstream.url)}, outbound_port=port, admin_port=free_port())
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        done = subprocess.run([sys.executable, "-m", "proxy", "run", "--config", str(path)], cwd=tmp_path,
                              env=env, capture_output=True, timeout=60)
    err = done.stderr.decode()
    assert done.returncode != 0, err
    assert "Traceback" not in err, err
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    [failed] = [r for r in records if r["level"] == "error"]
    assert f"127.0.0.1:{port}" in failed["msg"] and "in use" in failed["msg"], failed



def test_workers_that_cannot_bind_stop_the_sidecar_instead_of_restarting_forever(tmp_path, upstream):
    """workers > 1 and the port taken by another program: a restart cannot
    help, so the supervisor stops and exits non-zero (the orchestrator sees a
    failed start) rather than restarting the workers every second."""
    import os
    import socket
    import subprocess
    import sys

    from tests.support.sidecar import REPO

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(tmp_path, {"p": policy(upstream.url)}, outbound_port=port, admin_port=free_port(),
                            workers=2)
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        try:
            done = subprocess.run([sys.executable, "-m", "proxy", "run", "--config", str(path)], cwd=tmp_path,
                                  env=env, capture_output=True, timeout=60)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"still restarting after 60 s: {(e.stderr or b'').decode()[-800:]}") from None
    err = done.stderr.decode()
    assert done.returncode != 0, err
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert any(f"127.0.0.1:{port}" in r["msg"] and "in use" in r["msg"] for r in records), err


def test_text_log_format(tmp_path, upstream):
    proc = _process(tmp_path, {"p": policy(upstream.url)}, '')
    cfg = proc.config_path.read_text().replace("[logging]\n", '[logging]\nformat = "text"\n', 1)
    proc.config_path.write_text(cfg)
    proc.start()
    try:
        proc.signal()
        proc.wait()
    finally:
        proc.kill()
    _, err = proc.output()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert any(" INFO    sidecar: route /p -> " in ln for ln in lines), err
    assert not any(ln.startswith("{") for ln in lines)


async def test_hashed_identities_in_access_log(sidecar_factory, upstream, client, monkeypatch):
    monkeypatch.setenv("TEST_LOG_HASH_KEY", "k3y-for-audit")
    config = dict(logging='hash_identifiers = true\nhash_key = "env:TEST_LOG_HASH_KEY"')
    sc1 = await sidecar_factory({"p": policy(upstream.url)}, **config)
    sc2 = await sidecar_factory({"p": policy(upstream.url)}, **config)
    for sc in (sc1, sc2):
        async with client.get(f"{sc.url}/p/x", headers={"X-Tenant-ID": "acme-corp"}) as r:
            assert r.status == 200
    [l1], [l2] = await sc1.wait_access_lines(1), await sc2.wait_access_lines(1)

    def h(value: str) -> str:
        return hmac.new(b"k3y-for-audit", value.encode(), hashlib.sha256).hexdigest()[:16]

    assert l1["tenant"] == h("acme-corp") == l2["tenant"]
    assert l1["client"] == h("127.0.0.1") == l2["client"]
    assert "acme-corp" not in json.dumps(l1)
    plain = await sidecar_factory({"p": policy(upstream.url)})
    async with client.get(f"{plain.url}/p/x", headers={"X-Tenant-ID": "acme-corp"}) as r:
        assert r.status == 200
    [line] = await plain.wait_access_lines(1)
    assert line["tenant"] == "acme-corp" and line["client"] == "127.0.0.1"



async def test_hashed_identities_leave_no_tenant_in_clear_in_decisions(sidecar_factory, upstream, client,
                                                                       monkeypatch):
    """A plugin decision naming the tenant (auth's per-tenant credentials) is
    hashed like the tenant field: the line holds the identity nowhere in clear."""
    monkeypatch.setenv("TEST_LOG_HASH_KEY", "k3y-for-audit")
    monkeypatch.setenv("TEST_ACME_KEY", "a-key-1234")
    auth = ('[auth]\ntype = "bearer"\nsecret = "env:TEST_ACME_KEY"\n'
            '[auth.tenants.acme-corp]\nsecret = "env:TEST_ACME_KEY"\n')
    sc = await sidecar_factory({"p": policy(upstream.url, extra=auth)},
                               logging='hash_identifiers = true\nhash_key = "env:TEST_LOG_HASH_KEY"')
    async with client.get(f"{sc.url}/p/x", headers={"X-Tenant-ID": "acme-corp"}) as r:
        assert r.status == 200
    assert upstream.seen[-1].headers["Authorization"] == "Bearer a-key-1234"
    [line] = await sc.wait_access_lines(1)
    hashed = hmac.new(b"k3y-for-audit", b"acme-corp", hashlib.sha256).hexdigest()[:16]
    assert line["tenant"] == hashed
    assert line["decisions"]["auth_tenant"] == hashed     # still correlates with the tenant field
    assert "acme-corp" not in json.dumps(line)


async def test_hashed_identities_refuse_to_start_without_the_key(sidecar_factory, upstream, monkeypatch):
    import pytest

    from proxy.errors import ConfigError

    monkeypatch.delenv("TEST_LOG_HASH_KEY_MISSING", raising=False)
    with pytest.raises(ConfigError) as e:
        await sidecar_factory({"p": policy(upstream.url)},
                              logging='hash_identifiers = true\nhash_key = "env:TEST_LOG_HASH_KEY_MISSING"')
    assert "logging.hash_key: env:TEST_LOG_HASH_KEY_MISSING does not resolve" in e.value.problems[0]
