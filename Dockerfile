# syntax=docker/dockerfile:1
# sidecar: slim image, non-root, health-checked.
FROM python:3.11-slim AS build
# gcc and mypy (mypyc) in the build stage only: the request path's modules are
# compiled to C extensions (setup.py; docs/performance.md "Compiled request path").
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
COPY plugins ./plugins
# A build venv with the dependencies (mypyc type-checks the compiled modules
# against them) and the compile extra (mypy, stubs) makes the wheel; the
# runtime venv installs that wheel alone (otlp: spans to an OpenTelemetry
# collector, deploy/compose.yaml), so no build tool reaches the image.
RUN python -m venv /opt/build && /opt/build/bin/pip install --no-cache-dir '.[otlp,compile]' \
 && SIDECAR_COMPILE=1 /opt/build/bin/pip wheel --no-cache-dir --no-build-isolation --no-deps -w /wheels .
RUN python -m venv /opt/sidecar && /opt/sidecar/bin/pip install --no-cache-dir "$(ls /wheels/*.whl)[otlp]" \
 && cd / && /opt/sidecar/bin/python -c "import proxy; assert proxy.compiled()"

FROM python:3.11-slim
COPY --from=build /opt/sidecar /opt/sidecar
ENV PATH=/opt/sidecar/bin:$PATH
# libatomic1: the lock-free update of the rate-limit table shared by workers
# (plugins/rate_limit/gcra.py); without it a per-slot lock is used instead.
RUN apt-get update && apt-get install -y --no-install-recommends libatomic1 && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --home /app sidecar && mkdir -p /app/data && chown sidecar /app/data
WORKDIR /app
# The container's config.toml (deploy/container/config.toml): the outbound
# listener stays on loopback (the service shares the pod's network namespace;
# an outbound listener open to a network injects credentials for anyone, and
# the sidecar refuses it without [outbound] allowed_clients). The inbound
# (webhooks, 8443) and admin (9901) listeners bind every interface; every
# /admin/* endpoint needs "Authorization: Bearer $SIDECAR_ADMIN_TOKEN" (set it
# from a secret; without it /admin/* answers 503, failing closed), while
# /health, /ready, /metrics and the dashboard page stay open for probes and
# scrapers.
COPY deploy/container/config.toml ./config.toml
COPY policies ./policies
USER sidecar
EXPOSE 8443 9901
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9901/health', timeout=2).status == 200 else 1)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["sidecar"]
CMD ["run", "--config", "config.toml"]
