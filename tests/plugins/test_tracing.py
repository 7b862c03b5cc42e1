"""tracing plugin: config, W3C propagation, spans kept for /admin/traces, OTLP export."""

from __future__ import annotations

import pytest
from aiohttp import web
from pydantic import ValidationError

from plugins.tracing import Config, Settings
from tests.support.sidecar import free_port
from tests.support.upstream import FakeUpstream, wait_for

PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


def policy(url: str, extra: str = "") -> str:
    return f'route = "/p"\nupstream = "{url}"\n[tracing]\n{extra}\n'


@pytest.mark.parametrize("table,reason", [
    ({"sample_ratio": 1.5}, "less than or equal to 1"),
    ({"exporter": "zipkin"}, "'none', 'console', 'otlp' or 'memory'"),
    ({"keep": 0}, "greater than or equal to 1"),
])
def test_settings_rejects(table, reason):
    with pytest.raises(ValidationError) as e:
        Settings(**table)
    assert reason in str(e.value)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValidationError):
        Config(propagation=True)


async def test_child_span_is_propagated_and_kept(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": policy(upstream.url, 'attributes = { "provider" = "httpbin" }')},
                               '[tracing]\nexporter = "memory"\n')
    async with client.get(f"{sc.url}/p/x", headers={
            "traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01", "X-Tenant-ID": "acme"}) as r:
        assert r.status == 200
    sent = upstream.seen[-1].headers["traceparent"]
    version, trace_id, span_id, flags = sent.split("-")
    assert (version, trace_id, flags) == ("00", PARENT_TRACE, "01")
    assert span_id != PARENT_SPAN
    async with client.get(f"{sc.admin}/admin/traces") as r:
        (span,) = (await r.json())["spans"]
    assert span["trace_id"] == PARENT_TRACE and span["span_id"] == span_id
    assert span["parent_span_id"] == PARENT_SPAN
    assert span["name"] == "GET p"
    assert span["attributes"]["http.response.status_code"] == 200
    assert span["attributes"]["provider"] == "httpbin"
    assert span["attributes"]["sidecar.tenant"] == "acme"
    (line,) = await sc.wait_access_lines(1)
    assert line["decisions"]["tracing"] == PARENT_TRACE


async def test_sidecar_errors_mark_the_span(sidecar_factory, client):
    sc = await sidecar_factory({"p": policy(f"http://127.0.0.1:{free_port()}")}, '[tracing]\nexporter = "memory"\n')
    async with client.get(f"{sc.url}/p/x") as r:
        assert r.status == 502
    async with client.get(f"{sc.admin}/admin/traces") as r:
        (span,) = (await r.json())["spans"]
    assert span["status"] == "ERROR"
    assert span["attributes"]["sidecar.error"] == "upstream_unavailable"
    assert span["attributes"]["http.response.status_code"] == 502


async def test_unsampled_root_still_propagates_context(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": policy(upstream.url)}, '[tracing]\nexporter = "memory"\nsample_ratio = 0\n')
    async with client.get(f"{sc.url}/p/x") as r:
        assert r.status == 200
    flags = upstream.seen[-1].headers["traceparent"].rsplit("-", 1)[1]
    assert int(flags, 16) & 1 == 0  # the sampled bit is off
    async with client.get(f"{sc.admin}/admin/traces") as r:
        assert (await r.json())["spans"] == []
    (line,) = await sc.wait_access_lines(1)
    assert "decisions" not in line


async def test_unsampled_parent_is_followed_with_its_tracestate(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": policy(upstream.url)}, '[tracing]\nexporter = "memory"\nsample_ratio = 1\n')
    async with client.get(f"{sc.url}/p/x", headers={
            "traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-00", "tracestate": "vendor=abc"}) as r:
        assert r.status == 200
    seen = upstream.seen[-1].headers
    version, trace_id, span_id, flags = seen["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", PARENT_TRACE, "00")
    assert span_id not in (PARENT_SPAN, "0" * 16) and len(span_id) == 16
    assert seen["tracestate"] == "vendor=abc"
    async with client.get(f"{sc.admin}/admin/traces") as r:
        assert (await r.json())["spans"] == []


async def test_new_traces_are_sampled_by_the_sdk_ratio_rule(sidecar_factory, upstream, client):
    """The filter decides new traces itself; the decision must be the SDK's
    TraceIdRatioBased rule on the id that is propagated and recorded."""
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    sc = await sidecar_factory({"p": policy(upstream.url)},
                               '[tracing]\nexporter = "memory"\nsample_ratio = 0.5\nkeep = 1000\n')
    bound = TraceIdRatioBased(0.5).bound
    sent = []
    for _ in range(60):
        async with client.get(f"{sc.url}/p/x") as r:
            assert r.status == 200
        sent.append(upstream.seen[-1].headers["traceparent"].split("-"))
    async with client.get(f"{sc.admin}/admin/traces") as r:
        kept = {(s["trace_id"], s["span_id"]) for s in (await r.json())["spans"]}
    for version, trace_id, span_id, flags in sent:
        sampled = int(trace_id, 16) & ((1 << 64) - 1) < bound
        assert version == "00" and int(flags, 16) == (0x03 if sampled else 0x02)
        assert ((trace_id, span_id) in kept) == sampled
    assert 0 < len(kept) < 60


async def test_propagate_false_sends_no_traceparent(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": policy(upstream.url, "propagate = false")})
    async with client.get(f"{sc.url}/p/x") as r:
        assert r.status == 200
    assert "traceparent" not in upstream.seen[-1].headers


async def test_traces_endpoint_explains_when_spans_are_not_kept(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": policy(upstream.url)})
    async with client.get(f"{sc.admin}/admin/traces") as r:
        assert r.status == 404
        assert r.headers["X-Sidecar-Error"] == "traces_not_kept"


async def test_otlp_export_reaches_a_collector(sidecar_factory, upstream, client):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[ExportTraceServiceRequest] = []

    async def collect(request, seen):
        assert request.headers["Content-Type"] == "application/x-protobuf"
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(seen.body)
        received.append(msg)
        return web.Response(status=200)
    collector = await FakeUpstream(collect).start()
    try:
        sc = await sidecar_factory({"p": policy(upstream.url)},
                                   f'[tracing]\nexporter = "otlp"\nendpoint = "{collector.url}/v1/traces"\n')
        async with client.get(f"{sc.url}/p/x") as r:
            assert r.status == 200
        await wait_for(lambda: received, timeout=10)
        spans = [s for m in received for rs in m.resource_spans for ss in rs.scope_spans for s in ss.spans]
        assert [s.name for s in spans] == ["GET p"]
        service = {a.key: a.value.string_value for a in received[0].resource_spans[0].resource.attributes}
        assert service["service.name"] == "sidecar-test"
    finally:
        await collector.stop()


async def test_inbound_route_gets_a_server_span_and_the_service_the_context(sidecar_factory, upstream, client):
    from tests.support.inbound import inbound_config, inbound_url

    sc = await sidecar_factory({}, '[tracing]\nexporter = "memory"\n' + inbound_config(upstream.url, extra="""
        [inbound.routes."/api".tracing]
        attributes = { "side" = "in" }
        """))
    async with client.get(f"{inbound_url(sc)}/api/orders") as r:
        assert r.status == 200
    assert upstream.seen[0].path_qs == "/api/orders" and "traceparent" in upstream.seen[0].headers
    sc.runtime.services["tracing"].flush()
    (span,) = [s for s in sc.runtime.services["tracing"].recent.spans]
    assert span.kind.name == "SERVER" and span.attributes["side"] == "in"
    assert span.attributes["sidecar.route"] == "inbound:/api"
