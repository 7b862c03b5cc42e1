"""The access log buffers raw records and writes JSON lines at flush (issue 10):
same lines as before, bounded buffer, flushed at shutdown, extensible fields."""

from __future__ import annotations

import hashlib

import orjson
import pytest

from proxy.accesslog import AccessLog


def record(**over):
    base = dict(ts=1700000000.123456, rid="r1", route="p", tenant="acme", method="GET", path="/p/x",
                status=200, took=0.0123456, upstream=0.0045, attempt=1, log=None, error=None, headers=None,
                extra=None)
    base.update(over)
    return tuple(base.values())


def test_lines_have_the_documented_fields_in_order(tmp_path):
    al = AccessLog(str(tmp_path / "a.log"), worker=3)
    out = al.lines([record(), record(rid="r2", tenant=None, upstream=None, attempt=2,
                                     log={"rate_limit": {"result": "allowed"}}, error="upstream_timeout",
                                     headers={"User-Agent": "t/1"})])
    first, second, end = out.split(b"\n")
    assert end == b""
    assert first == (b'{"ts":1700000000.123,"request_id":"r1","route":"p","tenant":"acme","method":"GET",'
                     b'"path":"/p/x","status":200,"duration_ms":12.346,"worker":3,"upstream_ms":4.5}')
    assert list(orjson.loads(second)) == ["ts", "request_id", "route", "tenant", "method", "path", "status",
                                          "duration_ms", "worker", "attempts", "decisions", "error", "headers"]
    assert orjson.loads(second)["decisions"] == {"rate_limit": {"result": "allowed"}}


def test_added_fields_capture_per_request_and_render_at_flush(tmp_path):
    al = AccessLog(str(tmp_path / "a.log"))
    rendered = []

    def hashed(v):
        rendered.append(v)
        return hashlib.sha256(v.encode()).hexdigest()[:12]

    al.add_field("client", lambda ex: ex.client_ip if ex is not None else None, render=hashed)
    al.add_field("upstream_request_id", lambda ex: ex.vars.get("upstream_request_id") if ex else None)
    al.add_field("tenant", render=lambda t: "t-" + t)

    class Ex:
        client_ip = "10.1.2.3"
        vars = {"upstream_request_id": "req_abc"}

    extra = tuple(c(Ex) for c in al.captures)
    assert rendered == []                      # nothing rendered on the request path
    line = orjson.loads(al.lines([record(extra=extra)]).strip())
    assert line["client"] == hashlib.sha256(b"10.1.2.3").hexdigest()[:12]
    assert line["upstream_request_id"] == "req_abc" and line["tenant"] == "t-acme"
    assert list(line)[-2:] == ["client", "upstream_request_id"]
    none = orjson.loads(al.lines([record(tenant=None, extra=tuple(c(None) for c in al.captures))]).strip())
    assert "client" not in none and "upstream_request_id" not in none and none["tenant"] is None


def test_add_field_refuses_ambiguous_uses(tmp_path):
    al = AccessLog(str(tmp_path / "a.log"))
    with pytest.raises(ValueError, match="core field"):
        al.add_field("status", lambda ex: 1)
    with pytest.raises(ValueError, match="needs a capture"):
        al.add_field("new")
    al.add_field("x", lambda ex: 1)
    with pytest.raises(ValueError, match="already added"):
        al.add_field("x", lambda ex: 2)


async def test_buffer_is_bounded_by_records_not_only_time(tmp_path):
    path = tmp_path / "a.log"
    al = AccessLog(str(path), interval=3600, max_records=10)
    for i in range(25):
        al.append(record(rid=f"r{i}"))
    # Two batches of 10 were written without waiting for the (hour-long) timer.
    ids = [orjson.loads(x)["request_id"] for x in path.read_bytes().splitlines()]
    assert ids == [f"r{i}" for i in range(20)]
    al.close()
    ids = [orjson.loads(x)["request_id"] for x in path.read_bytes().splitlines()]
    assert ids == [f"r{i}" for i in range(25)]


async def test_unserialisable_added_value_does_not_lose_the_line(tmp_path):
    al = AccessLog(str(tmp_path / "a.log"))
    al.add_field("odd", lambda ex: object())
    line = orjson.loads(al.lines([record(extra=(object(),))]).strip())
    assert line["request_id"] == "r1" and line["odd"].startswith("<object object")


async def test_lines_are_flushed_at_shutdown(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": f'route = "/p"\nupstream = "{upstream.url}"\n'})
    sc.runtime.accesslog._interval = 3600      # only shutdown can write it now
    async with client.get(f"{sc.url}/p/one", headers={"X-Request-ID": "shut-1"}) as r:
        assert r.status == 200
    path = sc.dir / "access.log"
    assert not path.exists() or b"shut-1" not in path.read_bytes()
    await sc.sidecar.stop()
    lines = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    assert [x["request_id"] for x in lines] == ["shut-1"]
    assert lines[0]["path"] == "/p/one" and lines[0]["status"] == 200 and lines[0]["upstream_ms"] > 0
