"""fallback: a static answer instead of the provider's failure, and only then."""

from __future__ import annotations

import pytest
from aiohttp import web
from pydantic import ValidationError

from plugins.fallback import Config
from tests.plugins.test_retry import script
from tests.support.sidecar import free_port

FALLBACK = '''[fallback]
status = 200
headers = { "Content-Type" = "application/json", "Cache-Control" = "no-store" }
body = '{"items": [], "degraded": true}'
'''


def policy(url: str, extra: str = "") -> str:
    return f'route = "/up"\nupstream = "{url}"\n{extra}\n{FALLBACK}'


async def call(client, url: str, method: str = "GET", **kw) -> tuple[int, dict, bytes]:
    async with client.request(method, url, **kw) as r:
        return r.status, dict(r.headers), await r.read()


def assert_fallback(code: int, headers: dict, body: bytes) -> None:
    assert code == 200
    assert headers["X-Sidecar-Fallback"] == "1"
    assert headers["Content-Type"] == "application/json" and headers["Cache-Control"] == "no-store"
    assert body == b'{"items": [], "degraded": true}'
    assert "X-Sidecar-Error" not in headers


@pytest.mark.parametrize("bad,word", [
    ({"status": 99}, "greater than or equal to 200"),
    ({"headers": {"Bad Name": "x"}}, "not a valid header name"),
    ({"headers": {"Connection": "close"}}, "set by the sidecar"),
    ({"headers": {"Content-Length": "3"}}, "set by the sidecar"),
    ({"headers": {"X-A": "a\r\nX-B: b"}}, "CR, LF or NUL"),
    ({"headers": {"X-A": "a\x7fb"}}, "control character"),
    ({"on_status": [404]}, "5xx upstream answers only"),
])
def test_config_rejects(bad, word):
    with pytest.raises(ValidationError) as e:
        Config(**bad)
    assert word in str(e.value)


async def test_upstream_5xx_is_replaced(sidecar_factory, upstream, client):
    upstream.responder = script(502)
    sc = await sidecar_factory({"up": policy(upstream.url)})
    assert_fallback(*await call(client, f"{sc.url}/up/items"))
    assert len(upstream.seen) == 1
    line = (await sc.wait_access_lines(1))[-1]
    assert line["status"] == 200 and line["decisions"]["fallback"] == "502" and "error" not in line


async def test_unreachable_upstream_is_replaced(sidecar_factory, client):
    sc = await sidecar_factory({"up": policy(f"http://127.0.0.1:{free_port()}")})
    assert_fallback(*await call(client, f"{sc.url}/up/items"))
    assert (await sc.wait_access_lines(1))[-1]["decisions"]["fallback"] == "upstream_unavailable"


async def test_timeout_is_replaced(sidecar_factory, upstream, client):
    upstream.responder = script("hang")
    sc = await sidecar_factory({"up": policy(upstream.url, '[timeouts]\ntotal = "150ms"')})
    assert_fallback(*await call(client, f"{sc.url}/up/items"))
    assert (await sc.wait_access_lines(1))[-1]["decisions"]["fallback"] == "upstream_timeout"


async def test_open_circuit_is_answered_by_the_fallback_without_the_upstream(sidecar_factory, upstream, client):
    upstream.responder = script(500)
    sc = await sidecar_factory({"up": policy(upstream.url, '[circuit_breaker]\nfailure_threshold = 2')})
    for _ in range(4):
        assert_fallback(*await call(client, f"{sc.url}/up/items"))
    assert len(upstream.seen) == 2  # then the circuit opened
    decisions = [line["decisions"] for line in await sc.wait_access_lines(4)]
    assert [d["fallback"] for d in decisions] == ["500", "500", "circuit_open", "circuit_open"]
    assert decisions[-1]["circuit_breaker"] == "open"


async def test_fallback_after_retries_are_spent(sidecar_factory, upstream, client):
    upstream.responder = script(503)
    sc = await sidecar_factory({"up": policy(upstream.url, '[retry]\nbackoff = { base = "1ms", max = "2ms" }')})
    code, headers, body = await call(client, f"{sc.url}/up/items")
    assert_fallback(code, headers, body)
    assert headers["X-Sidecar-Attempts"] == "3"
    assert len(upstream.seen) == 3


async def test_success_and_client_errors_pass_through(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"up": policy(upstream.url, '[limits]\nmax_request_body = "10B"')})
    upstream.responder = script(404)
    code, headers, _ = await call(client, f"{sc.url}/up/missing")
    assert code == 404 and "X-Sidecar-Fallback" not in headers
    upstream.responder = script(200)
    code, headers, body = await call(client, f"{sc.url}/up/ok")
    assert code == 200 and body == b"try 1: 200" and "X-Sidecar-Fallback" not in headers
    # The sidecar's own 413 is the client's to fix: not hidden behind a fallback.
    code, headers, _ = await call(client, f"{sc.url}/up/big", "POST", data=b"x" * 100)
    assert code == 413 and headers["X-Sidecar-Error"] == "request_body_too_large"
    assert "X-Sidecar-Fallback" not in headers


async def test_on_status_selects_the_statuses(sidecar_factory, upstream, client):
    upstream.responder = script(500)
    sc = await sidecar_factory({"up": f'route = "/up"\nupstream = "{upstream.url}"\n'
                                      '[fallback]\nstatus = 503\nbody = "down"\non_status = [502]\n'})
    code, headers, _ = await call(client, f"{sc.url}/up/")
    assert code == 500 and "X-Sidecar-Fallback" not in headers
    upstream.responder = script(502)
    code, headers, body = await call(client, f"{sc.url}/up/")
    assert (code, body, headers["X-Sidecar-Fallback"]) == (503, b"down", "1")


async def test_fallback_on_a_streamed_upstream_5xx_drops_its_body(sidecar_factory, upstream, client):
    async def big_503(request, seen):
        resp = web.StreamResponse(status=503)
        await resp.prepare(request)
        for _ in range(64):
            await resp.write(b"e" * 16384)
        return resp

    upstream.responder = big_503
    sc = await sidecar_factory({"up": policy(upstream.url)})
    for _ in range(3):
        assert_fallback(*await call(client, f"{sc.url}/up/"))
    assert len(upstream.seen) == 3


FAILFAST_PLUGIN = '''
from proxy.plugin import CircuitOpen, Filter, Model, PluginSpec, SidecarError, hookimpl


class Config(Model):
    mode: str


class FailFast(Filter):
    def __init__(self, mode):
        self.mode = mode

    async def handle(self, ex, call_next):
        if self.mode == "class":
            # Its own code: the fallback must recognise the class, not a string.
            raise CircuitOpen("my breaker is open", code="my_breaker_open")
        raise SidecarError("looks like a breaker", status=503, code="circuit_open")


@hookimpl
def sidecar_plugins_register():
    return [PluginSpec("failfast", Config, 740, lambda c, ctx: FailFast(c.mode))]
'''


@pytest.mark.parametrize("mode,replaced", [("class", True), ("string", False)])
async def test_errors_are_matched_by_class_not_by_code_string(tmp_path, monkeypatch, sidecar_factory, upstream,
                                                              client, mode, replaced):
    (tmp_path / "failfast_plugin.py").write_text(FAILFAST_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    sc = await sidecar_factory({"p": policy(upstream.url, f'[failfast]\nmode = "{mode}"\n')},
                               sidecar='plugins = ["failfast_plugin"]')
    code, headers, body = await call(client, f"{sc.url}/up/x")
    if replaced:
        assert_fallback(code, headers, body)
    else:
        assert code == 503 and headers["X-Sidecar-Error"] == "circuit_open"
    assert upstream.seen == []
