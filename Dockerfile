# syntax=docker/dockerfile:1
# sidecar: slim image, non-root, health-checked.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY plugins ./plugins
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
# libatomic1: the lock-free update of the rate-limit table shared by workers
# (plugins/rate_limit/gcra.py); without it a per-slot lock is used instead.
RUN apt-get update && apt-get install -y --no-install-recommends libatomic1 && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --home /app sidecar && mkdir -p /app/data && chown sidecar /app/data
WORKDIR /app
COPY config.toml ./config.toml
COPY policies ./policies
# Inside a container the outbound listener must bind all interfaces; the admin
# listener stays on loopback (the HEALTHCHECK runs inside the container).
RUN python - <<'PY'
import re, pathlib
p = pathlib.Path("config.toml")
text = p.read_text()
text = re.sub(r'(\[outbound\]\nlisten = ")127\.0\.0\.1:', r'\g<1>0.0.0.0:', text)
p.write_text(text)
PY
USER sidecar
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9901/health', timeout=2).status == 200 else 1)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["sidecar"]
CMD ["run", "--config", "config.toml"]
