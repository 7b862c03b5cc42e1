"""tracing: an OpenTelemetry span per proxied request, W3C trace context to the upstream.

```toml
# config.toml: where spans go (one tracer provider per sidecar process)
[tracing]
exporter = "otlp"                                   # none | console | otlp | memory
endpoint = "http://127.0.0.1:4318/v1/traces"        # OTLP/HTTP (pip install 'sidecar-proxy[otlp]')
sample_ratio = 0.01                                 # new traces sampled; a sampled parent is always followed

# policies/openai.toml: trace this route
[tracing]
propagate = true                                    # send traceparent/tracestate upstream
attributes = { "provider" = "openai" }
```

The filter creates its own spans (the aiohttp auto-instrumentation costs
150-260 us per request, ARCHITECTURE.md). A span covers the request until the
upstream's response headers (or the sidecar's own answer); its trace id is
written to the access-log line (``decisions.tracing``) for correlation.
"""

from __future__ import annotations

from collections import deque
from functools import partial
from typing import Any, Literal, cast

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Tracer as SdkTracer, TracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.export import (BatchSpanProcessor, ConsoleSpanExporter, SpanExporter,
                                            SpanExportResult)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode, TraceFlags, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import Field

from proxy.chain import Defer, Exchange, Filter, Handler, ProxyResponse
from proxy.config import Model
from proxy.errors import SidecarError
from proxy.hookspecs import hookimpl
from proxy.plugins import BuildContext, PluginSpec

NAME = "tracing"
PRIORITY = 1000  # outermost: the span includes every other plugin's work and rejections


class Settings(Model):
    exporter: Literal["none", "console", "otlp", "memory"] = "none"
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    headers: dict[str, str] = Field(default_factory=dict)
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    # memory exporter: how many finished spans GET /admin/traces keeps.
    keep: int = Field(default=200, ge=1)


class Config(Model):
    propagate: bool = True
    attributes: dict[str, str | int | float | bool] = Field(default_factory=dict)


class RecentSpans(SpanExporter):
    """Keeps the last ``keep`` finished spans for GET /admin/traces."""

    def __init__(self, keep: int) -> None:
        self.spans: deque[ReadableSpan] = deque(maxlen=keep)

    def export(self, spans: Any) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class PresetIds(RandomIdGenerator):
    """The SDK's random ids, except that the filter may hand it the next trace
    id: the filter rolls a new trace's id itself to decide sampling without
    the SDK, and a sampled trace must then get that same id (and so the same
    decision) from the SDK."""

    def __init__(self) -> None:
        self.preset = 0

    def generate_trace_id(self) -> int:
        t = self.preset
        if t:
            self.preset = 0
            return t
        return super().generate_trace_id()


class Tracing:
    """The per-runtime tracer provider and exporter."""

    def __init__(self, settings: Settings, service: str) -> None:
        self.settings = settings
        self.recent: RecentSpans | None = None
        exporter: SpanExporter | None = None
        if settings.exporter == "console":
            exporter = ConsoleSpanExporter()
        elif settings.exporter == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                raise ValueError("exporter = \"otlp\" needs the otlp extra: pip install 'sidecar-proxy[otlp]'") from None
            exporter = OTLPSpanExporter(endpoint=settings.endpoint, headers=settings.headers or None)
        elif settings.exporter == "memory":
            exporter = self.recent = RecentSpans(settings.keep)
        self.ratio = TraceIdRatioBased(settings.sample_ratio)
        self.ids = PresetIds()
        self.provider = TracerProvider(resource=Resource.create({"service.name": f"sidecar-{service}"}),
                                       sampler=ParentBased(self.ratio), id_generator=self.ids)
        if exporter is not None:
            # The batch processor exports from its own thread, never on the loop.
            self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
        # The SDK provider returns its SDK Tracer (the filter reads its sampler's
        # _is_enabled), typed as the API's Tracer.
        self.tracer = cast(SdkTracer, self.provider.get_tracer("sidecar"))

    def flush(self) -> None:
        self.provider.force_flush(2000)

    def shutdown(self) -> None:
        self.provider.shutdown()


_PROPAGATOR = TraceContextTextMapPropagator()


_LOW64 = TraceIdRatioBased.TRACE_ID_LIMIT
_RANDOM = TraceFlags.RANDOM_TRACE_ID


class TracingFilter(Filter):
    """A span per request. An unsampled request (most of them at a 1% ratio)
    takes a fast path: the sampling decision is the SDK's own rule
    (ParentBased(TraceIdRatioBased), applied to an id from the provider's id
    generator), and the traceparent it propagates is the one the SDK would
    write, but no span object, context attach/detach or propagator runs
    (~20 us per request otherwise, docs/performance.md)."""

    def __init__(self, tracing: Tracing, route: str, config: Config, kind: SpanKind = SpanKind.CLIENT) -> None:
        self.kind = kind
        self.tracer = tracing.tracer
        self.ids = tracing.ids
        self.bound = tracing.ratio.bound
        self.random_ids = tracing.ids.is_trace_id_random()
        self.route = route
        self.propagate = config.propagate
        self.attributes = {"sidecar.route": route, **config.attributes}

    # An unsampled request (the common case at a low ratio) only rewrites the
    # traceparent: a sync layer (proxy/chain.py). A sampled one defers to _span.
    sync = True

    def before(self, ex: Exchange) -> Defer | None:
        parent = None
        # Exchange's header API, not ex.headers, unless there is a parent to
        # read: on the fast server the request head then stays bytes.
        if ex.has_header("traceparent"):
            parent = _PROPAGATOR.extract(ex.headers)
            pctx = get_current_span(parent).get_span_context()
            if pctx.is_valid:
                if pctx.trace_flags.sampled or not self.tracer._is_enabled():
                    return Defer(partial(self._span, parent=parent))
                # ParentBased: a remote parent that is not sampled is followed.
                flags = _RANDOM if pctx.trace_flags.random_trace_id else 0
                self._unsampled(ex, pctx.trace_id, flags,
                                pctx.trace_state.to_header() if pctx.trace_state else None)
                return None
        if not self.tracer._is_enabled():
            return Defer(partial(self._span, parent=parent))
        # A new trace: TraceIdRatioBased looks at the id's low 64 bits.
        trace_id = self.ids.generate_trace_id()
        if trace_id & _LOW64 < self.bound:
            return Defer(partial(self._span, parent=parent, preset=trace_id))
        self._unsampled(ex, trace_id, _RANDOM if self.random_ids else 0, None)
        return None

    def _unsampled(self, ex: Exchange, trace_id: int, flags: int, tracestate: str | None) -> None:
        if self.propagate:
            ex.remove_header("traceparent")
            ex.remove_header("tracestate")
            ex.set_header("traceparent", f"00-{trace_id:032x}-{self.ids.generate_span_id():016x}-{flags:02x}")
            if tracestate:
                ex.set_header("tracestate", tracestate)

    async def _span(self, ex: Exchange, call_next: Handler, parent: Any, preset: int | None = None) -> ProxyResponse:
        if preset is not None:
            # The id the sampling rule rolled, so the SDK reaches the same decision.
            self.ids.preset = preset
        with self.tracer.start_as_current_span(
                f"{ex.method} {self.route}", context=parent, kind=self.kind,
                attributes=self.attributes, record_exception=False, set_status_on_exception=False) as span:
            ctx = span.get_span_context()
            if ctx.trace_flags.sampled:
                ex.log[NAME] = format(ctx.trace_id, "032x")
                span.set_attribute("http.request.method", ex.method)
                span.set_attribute("sidecar.request_id", ex.request_id)
                if ex.tenant:
                    span.set_attribute("sidecar.tenant", ex.tenant)
            if self.propagate:
                ex.headers.popall("traceparent", None)
                ex.headers.popall("tracestate", None)
                _PROPAGATOR.inject(ex.headers)
            try:
                resp = await call_next(ex)
            except SidecarError as e:
                span.set_attribute("http.response.status_code", e.status)
                span.set_attribute("sidecar.error", e.code)
                span.set_status(Status(StatusCode.ERROR, e.code))
                raise
            span.set_attribute("http.response.status_code", resp.status)
            if resp.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            if ex.attempt > 1:
                span.set_attribute("sidecar.attempts", ex.attempt)
            return resp

    def describe(self) -> dict[str, Any]:
        return {"propagate": self.propagate}


def tracing_of(runtime: Any) -> Tracing:
    """The runtime's Tracing, created on first use."""
    return runtime.service(NAME, lambda: Tracing(runtime.extra_settings[NAME],
                                                  runtime.settings.sidecar.service))


def build(config: Config, ctx: BuildContext) -> Filter:
    # Inbound, the sidecar receives the request (a server span); outbound it
    # calls a provider (a client span), as OpenTelemetry's HTTP conventions say.
    kind = SpanKind.SERVER if ctx.scope == "inbound" else SpanKind.CLIENT
    return TracingFilter(tracing_of(ctx.runtime), ctx.route, config, kind)


@hookimpl
def sidecar_plugins_register() -> list[PluginSpec]:
    return [PluginSpec(NAME, Config, PRIORITY, build, scope="both",
                       description="OpenTelemetry spans and W3C trace context")]


@hookimpl
def sidecar_settings_register() -> dict[str, type]:
    return {NAME: Settings}


@hookimpl
def sidecar_runtime_shutdown(runtime: Any) -> None:
    tracing = runtime.services.pop(NAME, None)
    if tracing is not None:
        tracing.shutdown()


@hookimpl
def sidecar_admin_routes(runtime: Any, app: Any) -> None:
    from proxy.admin import json_error, json_response

    async def traces(request: Any) -> Any:
        tracing = runtime.services.get(NAME)
        if tracing is None or tracing.recent is None:
            return json_error(404, "traces_not_kept", 'set [tracing] exporter = "memory" to keep recent spans')
        tracing.flush()
        return json_response({"spans": [{
            "name": s.name, "trace_id": format(s.context.trace_id, "032x"),
            "span_id": format(s.context.span_id, "016x"),
            "parent_span_id": format(s.parent.span_id, "016x") if s.parent else None,
            "duration_ms": round(((s.end_time or 0) - (s.start_time or 0)) / 1e6, 3),
            "status": s.status.status_code.name, "attributes": dict(s.attributes or {}),
        } for s in reversed(tracing.recent.spans)]})

    app.router.add_get("/admin/traces", traces)
