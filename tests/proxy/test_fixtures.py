"""mode = "record" | "simulate" (proxy/fixtures.py): vcrpy cassettes written
from live traffic, without credentials, replayed with the upstream gone."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import httpx
import orjson
import pytest
import vcr
import yaml
from aiohttp import web
from multidict import CIMultiDict

from proxy.chain import Exchange
from tests.support.upstream import FakeUpstream, dribble, wait_for

SECRET = "sk-live-secret-value-123"
ORG = "org-secret-456"


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("FX_KEY", SECRET)
    monkeypatch.setenv("FX_ORG", ORG)


def policy(url: str, mode: str, extra: str = "") -> str:
    return textwrap.dedent(f'''\
        route = "/p"
        upstream = "{url}/base"
        mode = "{mode}"
        fixtures = "../cassettes"
        {extra}
        [auth]
        type = "bearer"
        secret = "env:FX_KEY"
        headers = {{ "X-Org" = "env:FX_ORG" }}
        ''')



def cassettes(sc) -> list[Path]:
    return sorted((sc.dir / "cassettes").glob("*.yaml"))


async def chat(request: web.Request, seen) -> web.Response:
    return web.json_response({"id": "chatcmpl-1", "answer": 42}, headers={"X-Request-ID": "req_up",
                                                                          "Set-Cookie": "session=abc"})


async def reload_to(sc, client, text: str) -> None:
    sc.write_policy("p", text)
    async with client.post(f"{sc.admin}/admin/reload") as r:
        assert r.status == 200, await r.text()


async def test_record_then_simulate_with_the_upstream_gone(env, sidecar_factory, client):
    up = await FakeUpstream(chat).start()
    sc = await sidecar_factory({"p": policy(up.url, "record")})
    async with client.post(f"{sc.url}/p/v1/chat?model=m1", json={"q": "hi"},
                           headers={"X-Debug-Token": "dbg-secret", "Cookie": "c=1"}) as r:
        assert r.status == 200 and (await r.json())["answer"] == 42
    await wait_for(lambda: cassettes(sc), timeout=5)
    (path,) = cassettes(sc)
    text = path.read_text()
    for leaked in (SECRET, ORG, "session=abc", "c=1"):
        assert leaked not in text
    data = yaml.safe_load(text)
    assert data["version"] == 1
    (it,) = data["interactions"]
    req, resp = it["request"], it["response"]
    assert req["method"] == "POST" and req["uri"] == f"{up.url}/base/v1/chat?model=m1"
    assert orjson.loads(req["body"]) == {"q": "hi"}
    names = {k.lower() for k in req["headers"]}
    assert not names & {"authorization", "x-org", "cookie", "x-request-id"}
    assert req["headers"]["X-Debug-Token"] == ["dbg-secret"]    # not a credential: kept
    assert resp["status"] == {"code": 200, "message": "OK"}
    assert orjson.loads(resp["body"]["string"]) == {"id": "chatcmpl-1", "answer": 42}
    assert "set-cookie" not in {k.lower() for k in resp["headers"]}

    # Simulate: the upstream is gone; the same request gets the same answer.
    await up.stop()
    await reload_to(sc, client, policy(up.url, "simulate"))
    async with client.post(f"{sc.url}/p/v1/chat?model=m1", json={"q": "other body"}) as r:
        assert r.status == 200 and (await r.json()) == {"id": "chatcmpl-1", "answer": 42}
        assert r.headers["X-Request-ID"] == "req_up"
        assert r.headers["Content-Type"].startswith("application/json")
    assert len(up.seen) == 1


async def test_logging_redact_headers_are_not_stored(env, client, upstream, tmp_path):
    from proxy.config import load_settings
    from proxy.server import Sidecar
    from tests.support.sidecar import RunningSidecar, write_config

    path = write_config(tmp_path, {"p": policy(upstream.url, "record")})
    path.write_text(path.read_text().replace("[logging]\n", '[logging]\nredact_headers = ["X-Customer-Email"]\n'))
    s = Sidecar(load_settings(path))
    await s.start()
    run = RunningSidecar(s, path)
    try:
        async with client.get(f"{run.url}/p/users", headers={"X-Customer-Email": "a@b.c"}) as r:
            assert r.status == 200
        await wait_for(lambda: cassettes(run), timeout=5)
        text = cassettes(run)[0].read_text()
        assert "a@b.c" not in text       # not as a header, nor in the upstream's echo of it
        req = yaml.safe_load(text)["interactions"][0]["request"]
        assert "x-customer-email" not in {k.lower() for k in req["headers"]}
        # The upstream did get it: only the stored copy leaves it out.
        assert upstream.seen[-1].headers["X-Customer-Email"] == "a@b.c"
    finally:
        await s.stop()


STREAM = b"".join(b"data: " + orjson.dumps({"n": i, "pad": "x" * 40}) + b"\n\n" for i in range(6))


async def test_streams_recorded_whole_and_replayed_in_their_chunks(env, sidecar_factory, client):
    up = await FakeUpstream(dribble(STREAM, piece=100, pause=0.05)).start()
    sc = await sidecar_factory({"p": policy(up.url, "record")})
    async with client.get(f"{sc.url}/p/v1/stream") as r:
        assert await r.read() == STREAM
    await wait_for(lambda: cassettes(sc), timeout=5)
    resp = yaml.safe_load(cassettes(sc)[0].read_text())["interactions"][0]["response"]
    body = resp["body"]
    assert body["string"].encode() == STREAM
    assert len(body["chunks"]) > 1 and sum(body["chunks"]) == len(STREAM)
    await up.stop()
    await reload_to(sc, client, policy(up.url, "simulate"))
    async with client.get(f"{sc.url}/p/v1/stream") as r:
        assert r.status == 200 and await r.read() == STREAM
    # Through the compiled chain: the body comes out in the recorded pieces.
    route, rest = sc.runtime.table.match("/p/v1/stream")
    ex = Exchange(route, "GET", rest, "", CIMultiDict(), request_id="t", started=0.0,
                  max_body=1 << 20)
    out = await route.handler(ex)
    pieces = [p async for p in out.body]
    assert [len(p) for p in pieces] == body["chunks"]


async def test_vcrpy_replays_a_recorded_cassette(env, sidecar_factory, client):
    up = await FakeUpstream(chat).start()
    sc = await sidecar_factory({"p": policy(up.url, "record")})
    async with client.post(f"{sc.url}/p/v1/chat?model=m1", json={"q": "hi"}) as r:
        assert r.status == 200
    await wait_for(lambda: cassettes(sc), timeout=5)
    await up.stop()     # vcrpy must not need it

    def replay() -> httpx.Response:
        with vcr.use_cassette(str(cassettes(sc)[0]), record_mode="none"):
            return httpx.post(f"{up.url}/base/v1/chat?model=m1", json={"q": "hi"})

    got = await asyncio.to_thread(replay)
    assert got.status_code == 200 and got.json() == {"id": "chatcmpl-1", "answer": 42}


def write_cassette(folder: Path, name: str, interactions: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(yaml.safe_dump({"interactions": interactions, "version": 1}))


def interaction(method: str, uri: str, status: int, body: str, req_body: str | None = None) -> dict:
    return {"request": {"method": method, "uri": uri, "body": req_body, "headers": {}},
            "response": {"status": {"code": status, "message": "X"},
                         "headers": {"Content-Type": ["application/json"], "Content-Length": ["999"]},
                         "body": {"string": body}}}


async def test_simulate_matching_no_fixture_admin_and_metrics(env, sidecar_factory, client, tmp_path):
    folder = tmp_path / "sc1" / "cassettes"
    # As vcrpy records them against the real provider: the host is ignored.
    write_cassette(folder, "models.yaml", [
        interaction("GET", "https://api.example.com/base/v1/models?b=2&a=1", 200, '{"data": ["m1"]}'),
        interaction("GET", "https://api.example.com/base/v1/page", 200, '{"page": 1}'),
        interaction("GET", "https://api.example.com/base/v1/page", 200, '{"page": 2}'),
    ])
    table = '[auth]\ntype = "query"\nparam = "api_key"\nsecret = "env:FX_KEY"\n'
    text = (f'route = "/p"\nupstream = "https://api.example.com/base"\nmode = "simulate"\n'
            f'fixtures = "../cassettes"\n{table}')
    sc = await sidecar_factory({"p": text})
    # Query order does not matter; the injected api_key is not part of the match.
    async with client.get(f"{sc.url}/p/v1/models?a=1&b=2") as r:
        assert r.status == 200 and (await r.json()) == {"data": ["m1"]}
        assert r.headers["Content-Length"] == str(len('{"data": ["m1"]}'))
    pages = []
    for _ in range(3):
        async with client.get(f"{sc.url}/p/v1/page") as r:
            pages.append((await r.json())["page"])
    assert pages == [1, 2, 2]          # in order, then the last one repeats
    async with client.get(f"{sc.url}/p/v1/other?x=1") as r:
        assert r.status == 501 and r.headers["X-Sidecar-Error"] == "no_fixture"
        body = await r.json()
    assert "GET /v1/other?x=1" in body["error"]["message"] and SECRET not in body["error"]["message"]
    async with client.get(f"{sc.admin}/admin/simulated") as r:
        view = await r.json()
    assert view["routes"]["p"]["mode"] == "simulate"
    latest = view["calls"][0]
    assert latest["status"] == 501 and latest["fixture"] is None and latest["path"] == "/v1/other"
    assert all(SECRET not in orjson.dumps(c).decode() for c in view["calls"])
    assert "api_key=%5Bredacted%5D" in view["calls"][1]["query"]
    assert view["calls"][1]["fixture"] == "models.yaml"
    async with client.get(f"{sc.admin}/metrics") as r:
        metrics = await r.text()
    assert 'sidecar_simulated_requests_total{result="matched",route="p"} 4.0' in metrics
    assert 'sidecar_simulated_requests_total{result="no_fixture",route="p"} 1.0' in metrics


async def test_match_body_compares_json_by_value(env, sidecar_factory, client, tmp_path):
    folder = tmp_path / "sc1" / "cassettes"
    write_cassette(folder, "a.yaml", [
        interaction("POST", "http://x/base/v1/chat", 200, '{"for": "a"}', req_body='{"q": "a", "n": 1}'),
        interaction("POST", "http://x/base/v1/chat", 200, '{"for": "b"}', req_body='{"q": "b", "n": 1}'),
    ])
    sc = await sidecar_factory({"p": policy("http://x", "simulate", "match_body = true")})
    async with client.post(f"{sc.url}/p/v1/chat", data=b'{"n": 1, "q": "b"}') as r:
        assert (await r.json()) == {"for": "b"}
    async with client.post(f"{sc.url}/p/v1/chat", data=b'{"n": 1, "q": "a"}') as r:
        assert (await r.json()) == {"for": "a"}
    async with client.post(f"{sc.url}/p/v1/chat", data=b'{"q": "c"}') as r:
        assert r.status == 501 and "with a body of sha256" in (await r.json())["error"]["message"]


async def test_plugins_before_the_terminal_still_run(sidecar_factory, client, tmp_path, monkeypatch):
    write_cassette(tmp_path / "sc1" / "cassettes", "a.yaml",
                   [interaction("GET", "http://x/base/v1/x", 200, "{}")])
    monkeypatch.delenv("FX_KEY", raising=False)
    sc = await sidecar_factory({"p": policy("http://x", "simulate",
                                            '[rate_limit]\nlimits = [{ requests = 1, per = "1m" }]')})
    async with client.get(f"{sc.url}/p/v1/x") as r:
        assert r.status == 503 and r.headers["X-Sidecar-Error"] == "secret_unavailable"
    monkeypatch.setenv("FX_KEY", SECRET)
    monkeypatch.setenv("FX_ORG", ORG)
    async with client.get(f"{sc.url}/p/v1/x") as r:
        assert r.status == 429 and r.headers["X-Sidecar-Error"] == "rate_limited"   # the first one counted


async def test_simulate_config_problems(sidecar_factory, client, tmp_path, upstream):
    from proxy.errors import ConfigError

    with pytest.raises(ConfigError, match="is not a folder"):
        await sidecar_factory({"p": policy(upstream.url, "simulate")})
    folder = tmp_path / "sc2" / "cassettes"
    folder.mkdir(parents=True)
    (folder / "bad.yaml").write_text("interactions: [{request: {}}]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: \(cassette\): not a vcrpy cassette"):
        await sidecar_factory({"p": policy(upstream.url, "simulate")})
    with pytest.raises(ConfigError, match="mode, fixtures and match_body are for a policy with a route"):
        await sidecar_factory({"w": 'mode = "simulate"\n'})
    with pytest.raises(ConfigError, match="mode"):
        await sidecar_factory({"p": policy(upstream.url, "replay")})


async def test_a_bad_cassette_on_reload_keeps_the_last_good_set(env, sidecar_factory, client, tmp_path):
    folder = tmp_path / "sc1" / "cassettes"
    write_cassette(folder, "a.yaml", [interaction("GET", "http://x/base/v1/x", 200, '{"v": 1}')])
    sc = await sidecar_factory({"p": policy("http://x", "simulate")})
    (folder / "b.yaml").write_text(": not yaml : [")
    sc.write_policy("p", policy("http://x", "simulate", "# touched"))
    async with client.post(f"{sc.admin}/admin/reload") as r:
        assert r.status == 422 and "b.yaml" in await r.text()
    async with client.get(f"{sc.url}/p/v1/x") as r:
        assert (await r.json()) == {"v": 1}


async def test_concurrent_identical_exchanges_leave_one_whole_cassette(env, sidecar_factory, client, caplog):
    """Identical requests recorded at once write the same cassette name: each
    write goes through its own temporary file, so the cassette left is one
    whole recording (never two interleaved) and no write fails."""
    big = {"rows": ["x" * 64 for _ in range(8000)]}   # half a MB of YAML: writes overlap

    async def large(request: web.Request, seen) -> web.Response:
        return web.json_response(big)

    async with FakeUpstream(large) as up:
        sc = await sidecar_factory({"p": policy(up.url, "record")})

        async def one() -> int:
            async with client.get(f"{sc.url}/p/v1/rows") as r:
                await r.read()
                return r.status

        with caplog.at_level("ERROR", logger="sidecar.fixtures"):
            assert await asyncio.gather(*(one() for _ in range(12))) == [200] * 12

            def settled() -> bool:   # every write ended: stored (counted) or failed (logged)
                text = sc.runtime.metrics.exposition().decode()
                stored = [ln for ln in text.splitlines() if ln.startswith('sidecar_recorded_exchanges_total{route="p"}')]
                done = float(stored[0].split()[-1]) if stored else 0.0
                return done + len(caplog.records) >= 12

            await wait_for(settled, timeout=60)
        assert not [r for r in caplog.records if "writing cassette" in r.getMessage()]
    [path] = cassettes(sc)
    data = yaml.safe_load(path.read_text())
    assert orjson.loads(data["interactions"][0]["response"]["body"]["string"]) == big
    assert not list((sc.dir / "cassettes").glob(".*.tmp"))
