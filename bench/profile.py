"""Per-layer profile of a running sidecar: py-spy samples during a wrk run,
each sample charged to the innermost frame that belongs to a layer, scaled
by the process's user CPU per request; the kernel row is its system CPU.

Layers (first match from the innermost frame outwards):

- chain: proxy/chain.py and plugins/ (the filters)
- client: the upstream client (proxy/fastclient/, proxy/upstream.py, aiohttp's client)
- handler: the per-request core (proxy/outbound.py or the fast server's
  exchange/drive/express, admission, runtime, access log, metrics...)
- server: the listener (proxy/fastserver/, the write batch, proxy/server.py,
  aiohttp's server side)
- loop/other: what none of them is in (event loop, GC, ...)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("chain", ("proxy/chain.py", "plugins/")),
    ("client", ("proxy/fastclient/", "proxy/upstream.py", "aiohttp/client", "aiohttp/connector")),
    ("handler", ("proxy/outbound.py", "proxy/fastserver/exchange.py", "proxy/fastserver/drive.py",
                 "proxy/fastserver/express.py", "proxy/admission.py", "proxy/rawexchange.py",
                 "proxy/response_id.py", "proxy/runtime.py", "proxy/accesslog.py", "proxy/metrics.py",
                 "prometheus_client/", "proxy/http.py", "proxy/routes.py", "proxy/errors.py",
                 "proxy/secrets.py", "proxy/redact.py", "orjson")),
    ("server", ("proxy/fastserver/", "proxy/writebatch.py", "proxy/server.py", "aiohttp/web", "aiohttp/http_", "aiohttp/base_protocol",
                "aiohttp/streams", "aiohttp/helpers", "aiohttp/abc", "aiohttp/payload")),
)
ORDER = ("server", "handler", "chain", "client", "loop/other")


def pyspy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    cand = Path(sys.executable).with_name("py-spy")
    return str(cand) if cand.exists() else None


def classify(stack: str) -> str:
    """The layer of one collapsed stack ("f (file:line);g (file:line)", root first)."""
    for frame in reversed(stack.split(";")):
        lo, _, rest = frame.rpartition(" (")
        where = rest or lo
        for layer, marks in LAYERS:
            for m in marks:
                if m in where:
                    return layer
    return "loop/other"


def parse(raw: str) -> Counter:
    shares: Counter = Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            shares[classify(stack)] += int(n)
    return shares


def profile(pid: int, run_load, duration: float, rate: int = 250) -> dict:
    """Sample ``pid`` with py-spy while ``run_load()`` (returning the number of
    requests) drives it; µs per request per layer."""
    spy = pyspy()
    if spy is None:
        return {"error": "py-spy not installed (pip install '.[bench]')"}
    out = Path(f"/tmp/sidecar-bench-spy-{pid}-{int(time.time())}.txt")
    proc = psutil.Process(pid)
    t0 = proc.cpu_times()
    # --nonblocking: the target is not paused per sample (no distortion of
    # the run being measured; a torn stack now and then is the price).
    sp = subprocess.Popen([spy, "record", "-r", str(rate), "-f", "raw", "--nonblocking", "-o", str(out),
                           "-d", str(max(1, int(round(duration)))), "-p", str(pid)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.3)   # py-spy attaches
    requests = run_load()
    t1 = proc.cpu_times()
    try:
        _, err = sp.communicate(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        sp.kill()
        return {"error": "py-spy did not finish"}
    if not out.exists():
        return {"error": f"py-spy wrote nothing: {err.decode(errors='replace').strip()[-300:]}"}
    shares = parse(out.read_text())
    out.unlink(missing_ok=True)
    total = sum(shares.values())
    n = max(requests, 1)
    user_us = (t1.user - t0.user) / n * 1e6
    sys_us = (t1.system - t0.system) / n * 1e6
    layers = {k: (shares.get(k, 0) / total * user_us if total else float("nan")) for k in ORDER}
    layers["kernel"] = sys_us
    return {"samples": total, "requests": requests, "user_us": user_us, "system_us": sys_us,
            "layers_us": layers, "shares": {k: shares.get(k, 0) / total if total else 0.0 for k in ORDER}}
