"""Micro-benchmarks (pytest-benchmark): the per-request cost of each filter and
of the core's per-request pieces, without sockets.

    python -m pytest bench/test_filter_costs.py --benchmark-only
    python -m pytest bench/test_filter_costs.py --benchmark-disable   # just check they run

Each filter is built from its table in bench/chain.toml (the production chain)
and wrapped around a terminal that answers at once; the coroutine is driven by
hand (``send(None)``) so the numbers are the filter's own Python cost, not the
event loop's. A filter that really suspends (Redis, a token fetch) is measured
on a real loop instead.
"""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.chain import Exchange, ProxyResponse, compile_chain
from proxy.config import LoggingSettings, Settings
from proxy.http import strip_hop_by_hop
from proxy.plugins import BuildContext
from proxy.runtime import Runtime

CHAIN = tomllib.loads((Path(__file__).parent / "chain.toml").read_text())
CONFIG_TABLES = CHAIN.pop("config_toml", {})
REQUEST_HEADERS = [("Host", "127.0.0.1:8080"), ("User-Agent", "bench/1"), ("Accept", "*/*"),
                   ("Content-Type", "application/json"), ("X-Request-ID", "r1"), ("X-Tenant", "t1")]


def make_exchange() -> Exchange:
    return Exchange(None, "GET", "/json", "", CIMultiDict(REQUEST_HEADERS),  # type: ignore[arg-type]
                    tenant="t1", request_id="r1", client_ip="127.0.0.1", started=0.0, max_body=1 << 20)


async def terminal(ex: Exchange) -> ProxyResponse:
    return ProxyResponse(200, CIMultiDict([("Content-Type", "application/json"), ("Server", "up")]), b"{}")


def drive(handler, ex):
    coro = handler(ex)
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    # The filter suspended: finish it on a loop (slower, but still correct).
    coro.close()
    return asyncio.new_event_loop().run_until_complete(handler(make_exchange()))


@pytest.fixture(scope="module")
def runtime():
    import os

    os.environ.setdefault("BENCH_TOKEN", "bench-secret-token")
    return Runtime(Settings(logging=LoggingSettings(access_log="off"), extra_tables=CONFIG_TABLES))


def _policy_like(name: str, runtime: Runtime):
    from types import SimpleNamespace

    return SimpleNamespace(name="bench", core=SimpleNamespace(route="/bench", upstream="http://127.0.0.1:1"),
                           raw={name: CHAIN[name]}, plugins={}, file="bench/chain.toml")


@pytest.mark.parametrize("name", sorted(CHAIN))
def test_filter_cost(benchmark, runtime, name):
    spec = runtime.specs.get(name)
    if spec is None:
        pytest.skip(f"plugin {name} is not in this checkout")
    config = spec.config.model_validate(CHAIN[name])
    policy = _policy_like(name, runtime)
    f = spec.build(config, BuildContext("bench", policy, runtime))
    if f is None:
        pytest.skip(f"{name} builds no filter for this config")
    handler = compile_chain([f], terminal)
    resp = drive(handler, make_exchange())
    assert resp.status == 200
    benchmark(lambda: drive(handler, make_exchange()))


def test_baseline_no_filter(benchmark):
    handler = compile_chain([], terminal)
    benchmark(lambda: drive(handler, make_exchange()))


def test_strip_hop_by_hop(benchmark):
    h = CIMultiDictProxy(CIMultiDict(REQUEST_HEADERS + [("Connection", "keep-alive")]))
    out = benchmark(strip_hop_by_hop, h)
    assert "Connection" not in out


def test_fastclient_request_head(benchmark):
    """Serialising the upstream request head (what FastUpstream.send does)."""
    headers = CIMultiDict(REQUEST_HEADERS)

    def head() -> bytes:
        lines = ["GET /json HTTP/1.1"]
        lines.extend([f"{k}: {v}" for k, v in headers.items()])
        lines.append("\r\n")
        s = "\r\n".join(lines)
        assert s.count("\n") == len(lines)
        return s.encode("utf-8", "surrogateescape")

    assert benchmark(head).startswith(b"GET /json")


@pytest.mark.parametrize("looked", [False, True], ids=["bytes", "mapping"])
def test_production_chain_and_request_head(benchmark, runtime, looked):
    """The whole chain of bench/chain.toml on the fast server's RawExchange,
    then the fast client's request head: the filters edit the header bytes
    (Exchange's header API), or the mapping when a filter has read
    ``ex.headers`` (``mapping``: what every request paid before they used the API)."""
    from types import SimpleNamespace

    from proxy.fastclient.send import FastUpstream
    from proxy.fastserver.head import FastHead

    filters = []
    for name in CHAIN:
        spec = runtime.specs.get(name)
        if spec is not None:
            f = spec.build(spec.config.model_validate(CHAIN[name]), BuildContext("bench", _policy_like(name, runtime),
                                                                                   runtime))
            if f is not None:
                f.name = name
                filters.append((spec.priority, name, f))
    filters.sort(key=lambda t: (-t[0], t[1]))
    up = FastUpstream("http://127.0.0.1:1", None, SimpleNamespace(connect=1.0, idle=60.0))  # type: ignore[arg-type]
    heads = []

    async def send(ex):
        heads.append(up.prepare(ex)[0])
        return ProxyResponse(200, CIMultiDict([("Content-Type", "application/json")]), b"{}")

    handler = compile_chain([f for _, _, f in filters], send)
    raw = [(k.encode(), v.encode()) for k, v in REQUEST_HEADERS if k != "X-Request-ID"]
    extra = [("X-Forwarded-For", "127.0.0.1"), ("X-Forwarded-Proto", "http"),
             ("X-Forwarded-Host", "127.0.0.1:8080"), ("X-Request-ID", "r1")]

    def one():
        head = FastHead("GET", "/bench/json", raw, "127.0.0.1", "1.1", True, 0.0)
        ex = head.build(None, "/json", "", list(extra), False, tenant="t1", request_id="r1",  # type: ignore[arg-type]
                        client_ip="127.0.0.1", started=0.0, max_body=1 << 20)
        if looked:
            ex.headers  # noqa: B018 -- a filter had a look
        return drive(handler, ex)

    assert one().status == 200 and b"Authorization: Bearer " in heads[-1]
    benchmark(one)
