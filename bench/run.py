"""``python -m bench``: every comparison in one sitting, same load generator and settings.

Targets (each a single process / worker / thread): direct to the upstream,
nginx and HAProxy as reverse proxies (when installed), the naive aiohttp proxy
(bench/baselines), the sidecar with no plugins (and with the other listener
when the checkout has ``[outbound] server``), with auth + rate_limit +
circuit_breaker + headers, and with the production chain (bench/chain.toml,
plus metrics and a file access log). Then, per ``--sections``: a per-layer
py-spy profile, each filter's end-to-end cost (interleaved wrk A/B), workers
= 2 next to nginx with 2 workers, and the SSE / transfer / idle probes. The
results markdown ends with issue 10's targets, met or not. ``--quick`` runs
it all with short rounds (a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from . import loadgen
from . import profile as bench_profile

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: Where the sidecar under test imports proxy/ and plugins/ from (``--compiled``:
#: a copy with the request path built by mypyc); None: REPO.
SIDECAR_SRC: Path | None = None
JSON_BODY = '{"ok":true,"service":"bench","items":[1,2,3,4,5,6,7,8]}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {proc.args!r}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    port: int

    def tree(self) -> list[psutil.Process]:
        try:
            p = psutil.Process(self.popen.pid)
            return [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu(self) -> float:
        total = 0.0
        for p in self.tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def rss(self) -> int:
        total = 0
        for p in self.tree():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def spawn(name: str, args: list[str], port: int, cwd: Path, env: dict | None = None) -> Proc:
    log = open(cwd / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
    popen = subprocess.Popen(args, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, **(env or {})})
    wait_port(port, popen)
    return Proc(name, popen, port)


# ---- targets -----------------------------------------------------------------

def nginx_conf(work: Path, body: str, workers: int = 1) -> str:
    return textwrap.dedent(f"""\
        worker_processes {workers};
        daemon off;
        user root;
        pid {work}/nginx-{abs(hash(body)) % 10**8}.pid;
        error_log {work}/nginx-error.log warn;
        worker_rlimit_nofile 65535;
        events {{ worker_connections 20000; }}
        http {{
          access_log off;
          client_body_temp_path {work}/nginx-body;
          proxy_temp_path {work}/nginx-proxy;
          fastcgi_temp_path {work}/nginx-fcgi;
          uwsgi_temp_path {work}/nginx-uwsgi;
          scgi_temp_path {work}/nginx-scgi;
          keepalive_requests 100000;
          {body}
        }}
        """)


def start_upstream(work: Path, use_nginx: bool) -> tuple[Proc, str]:
    port = free_port()
    if use_nginx:
        conf = work / "nginx-upstream.conf"
        conf.write_text(nginx_conf(work, f"""server {{ listen 127.0.0.1:{port} backlog=4096;
            location = /json {{ default_type application/json; return 200 '{JSON_BODY}'; }} }}"""))
        return spawn("upstream-nginx", ["nginx", "-c", str(conf), "-e", str(work / "nginx-e.log")],
                     port, work), "nginx"
    return spawn("upstream-builtin", [sys.executable, "-m", "bench.upstream", str(port)], port, work,
                 {"PYTHONPATH": str(REPO)}), "built-in (asyncio + httptools)"


def start_nginx_proxy(work: Path, up: int, workers: int = 1) -> Proc:
    port = free_port()
    conf = work / f"nginx-proxy-{workers}w.conf"
    conf.write_text(nginx_conf(work, f"""upstream up {{ server 127.0.0.1:{up}; keepalive 64; }}
        server {{ listen 127.0.0.1:{port} backlog=4096;
          location /bench/ {{ proxy_pass http://up/; proxy_http_version 1.1;
                              proxy_set_header Connection ""; }} }}""", workers))
    return spawn(f"nginx-{workers}w", ["nginx", "-c", str(conf), "-e", str(work / f"nginx-e-{workers}w.log")],
                 port, work)


def start_haproxy(work: Path, up: int) -> Proc:
    port = free_port()
    conf = work / "haproxy.cfg"
    conf.write_text(textwrap.dedent(f"""\
        global
          nbthread 1
          maxconn 9000
        defaults
          mode http
          timeout connect 5s
          timeout client 60s
          timeout server 60s
          http-reuse always
          option http-keep-alive
        frontend f
          bind 127.0.0.1:{port}
          default_backend b
        backend b
          http-request replace-path /bench(.*) \\1
          server s1 127.0.0.1:{up} maxconn 1000
        """))
    return spawn("haproxy", ["haproxy", "-f", str(conf)], port, work)


def start_naive(work: Path, up: int) -> Proc:
    port = free_port()
    return spawn("naive", [sys.executable, "-m", "bench.baselines.naive_aiohttp", str(port),
                           f"http://127.0.0.1:{up}"], port, work, {"PYTHONPATH": str(REPO)})


def chain_tables() -> tuple[dict[str, tuple[str, str]], list[str]]:
    """The bench/chain.toml tables whose plugins exist and validate here, as
    {plugin: (policy TOML, config.toml TOML it needs)}, and what was skipped."""
    from proxy.config import Settings
    from proxy.plugins import collect_specs, make_plugin_manager

    specs = collect_specs(make_plugin_manager(Settings().sidecar.plugins))
    tables = tomllib.loads((HERE / "chain.toml").read_text())
    config_tables = tables.pop("config_toml", {})
    used: dict[str, tuple[str, str]] = {}
    skipped = []
    for name, table in tables.items():
        spec = specs.get(name)
        if spec is None:
            skipped.append(f"{name} (not in this checkout)")
            continue
        try:
            spec.config.model_validate(table)
        except Exception as e:  # noqa: BLE001 - reported, the bench goes on
            skipped.append(f"{name} (config does not validate: {str(e).splitlines()[0]})")
            continue
        cfg = _toml_table(name, config_tables[name]) if name in config_tables else ""
        used[name] = (_toml_table(name, table), cfg)
    return used, skipped


def production_chain(only: tuple[str, ...] | None = None) -> tuple[str, list[str], list[str], str]:
    """The policy TOML of the chain (every usable table, or those in ``only``),
    the plugins used, those skipped, and the config.toml tables they need."""
    tables, skipped = chain_tables()
    if only is not None:
        skipped += [f"{n} (not in this checkout)" for n in only if n not in tables]
        tables = {n: t for n, t in tables.items() if n in only}
    return ("\n".join(t[0] for t in tables.values()), list(tables), skipped,
            "".join(t[1] for t in tables.values()))


# The issue-10 "core" chain: auth + rate_limit + circuit_breaker + headers.
CORE4 = ("headers", "auth", "rate_limit", "circuit_breaker")


def server_supported() -> bool:
    """Whether this checkout has ``[outbound] server`` (the fast server's choice)."""
    from proxy.config import OutboundSettings

    return "server" in OutboundSettings.model_fields


def _toml_table(name: str, table: dict) -> str:
    lines, subs = [f"[{name}]"], []
    for k, v in table.items():
        if isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()) and v:
            subs.extend(_toml_table(f"{name}.{k}", {kk: vv for kk, vv in v.items()}).splitlines())
        elif isinstance(v, dict) and not any(isinstance(x, dict) for x in v.values()) and _is_section(v):
            subs.append(_toml_table(f"{name}.{k}", v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines + subs) + "\n"


def _is_section(v: dict) -> bool:
    return any(isinstance(x, list | dict) for x in v.values()) or len(v) > 1


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def start_sidecar(work: Path, name: str, up: int, builtin: int, chain: str, access_log: bool,
                  client: str, config: str = "", *, workers: int = 1, server: str | None = None) -> Proc:
    d = work / name
    (d / "policies").mkdir(parents=True, exist_ok=True)
    port, admin = free_port(), free_port()
    log = f'"{d / "access.log"}"' if access_log else '"off"'
    (d / "config.toml").write_text(textwrap.dedent(f"""\
        [sidecar]
        service = "bench"
        workers = {workers}
        watch = false
        [outbound]
        listen = "127.0.0.1:{port}"
        pool_size = 256
        client = "{client}"
        {f'server = "{server}"' if server else ""}
        [admin]
        listen = "127.0.0.1:{admin}"
        [logging]
        access_log = {log}
        level = "warning"
        """) + config)
    (d / "policies" / "bench.toml").write_text(
        f'route = "/bench"\nupstream = "http://127.0.0.1:{up}"\n[timeouts]\ntotal = "0s"\n\n{chain}')
    (d / "policies" / "b2.toml").write_text(
        f'route = "/b2"\nupstream = "http://127.0.0.1:{builtin}"\n[timeouts]\ntotal = "0s"\n')
    return spawn(name, [sys.executable, "-m", "proxy", "run", "--config", str(d / "config.toml")], port, d,
                 {"PYTHONPATH": str(SIDECAR_SRC or REPO), "BENCH_TOKEN": "bench-secret-token"})


def compiled_copy(work: Path) -> Path:
    """A copy of the package with the request path compiled in place (setup.py,
    ``SIDECAR_COMPILE=1``), as the container image runs it."""
    src = work / "compiled"
    src.mkdir()
    for name in ("proxy", "plugins"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=src, check=True,
                   env={**os.environ, "SIDECAR_COMPILE": "1"}, stdout=subprocess.DEVNULL)
    return src


# ---- measurements ------------------------------------------------------------

@dataclass
class Result:
    target: str
    rps: float = float("nan")
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    p999_ms: float = float("nan")
    cpu_us: float = float("nan")
    errors: int = 0
    notes: list[str] = field(default_factory=list)
    runs: list[tuple[float, float]] = field(default_factory=list)   # (req/s, CPU µs/req) per round
    lat_runs: list[float] = field(default_factory=list)             # p99 ms of each fixed-rate round


def run_wrk(url: str, connections: int, duration: float, threads: int = 1) -> dict:
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, int(round(duration)))}s", "--latency", url],
                         capture_output=True, text=True, timeout=duration + 30).stdout
    rps_m, total_m = re.search(r"Requests/sec:\s+([\d.]+)", out), re.search(r"(\d+) requests in", out)
    if rps_m is None or total_m is None:
        raise RuntimeError(f"wrk printed no summary: {out[-500:]!r}")
    rps, total = float(rps_m.group(1)), int(total_m.group(1))
    errs = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(errs.group(1)) if errs else 0) + (sum(int(x) for x in sock.groups()) if sock else 0)
    return {"rps": rps, "requests": total, "errors": errors}


def measure(proc: Proc, url: str, connections: int, duration: float, use_wrk: bool) -> dict:
    """One closed-loop run: req/s, errors and the target's CPU µs per request."""
    cpu0 = proc.cpu()
    if use_wrk:
        r = run_wrk(url, connections, duration)
    else:
        r = asyncio.run(loadgen.closed_loop(url, connections, duration))
    r["cpu_us"] = (proc.cpu() - cpu0) / max(r["requests"], 1) * 1e6
    return r


def interleaved(targets: list[tuple[str, Proc, str]], args, use_wrk: bool, duration: float) -> dict:
    """``args.rounds`` rounds over every target, order reversed every other
    round (A/B on a shared machine: a neighbour's burst hits all alike).
    Returns {name: {"rps": median, "cpu_us": median, "runs": [...]}}."""
    import statistics as st

    for _, proc, url in targets:
        measure(proc, url, args.connections, 1, use_wrk)   # warm-up
    runs: dict[str, list[dict]] = {n: [] for n, _, _ in targets}
    for r in range(args.rounds):
        for name, proc, url in (targets if r % 2 == 0 else list(reversed(targets))):
            runs[name].append(measure(proc, url, args.connections, duration, use_wrk))
    return {n: {"rps": st.median(x["rps"] for x in v), "cpu_us": st.median(x["cpu_us"] for x in v),
                "errors": sum(x["errors"] for x in v), "runs": [(x["rps"], x["cpu_us"]) for x in v]}
            for n, v in runs.items()}


class RssSampler:
    def __init__(self, proc: Proc, interval: float = 0.02) -> None:
        self.proc, self.interval, self.peak = proc, interval, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.rss())
            time.sleep(self.interval)

    def __enter__(self) -> "RssSampler":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def fmt(x: float, digits: int = 2) -> str:
    if x != x:  # NaN
        return "–"
    return f"{x:,.{digits}f}"


# ---- the sitting -------------------------------------------------------------

QUICK = {"duration": 2.0, "rate_duration": 3.0, "idle": 2000, "transfer_mb": 20, "rounds": 2,
         "profile_duration": 3.0, "latency_rounds": 1}
FULL = {"duration": 8.0, "rate_duration": 8.0, "idle": 10000, "transfer_mb": 100, "rounds": 4,
        "profile_duration": 8.0, "latency_rounds": 3}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--name", default=None, help="results file name (default: date + git commit)")
    ap.add_argument("--quick", action="store_true",
                    help="short rounds (~3 minutes in all): a smoke run, not a measurement")
    ap.add_argument("--duration", type=float, default=None, help="seconds per throughput run (8; quick 2)")
    ap.add_argument("--connections", type=int, default=32, help="closed-loop connections (wrk -c)")
    ap.add_argument("--rate", type=float, default=1000.0, help="requests/s of the fixed-rate latency run")
    ap.add_argument("--rate-duration", type=float, default=None)
    ap.add_argument("--latency-rounds", type=int, default=None,
                    help="interleaved rounds of the fixed-rate latency runs; p50/p99/p99.9 are their medians (3; quick 1)")
    ap.add_argument("--idle", type=int, default=None, help="idle keep-alive connections for the RSS probe (10000)")
    ap.add_argument("--transfer-mb", type=int, default=None, help="MB moved each way (100)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds of the throughput table and of the per-filter and workers A/B sections (4; quick 2)")
    ap.add_argument("--profile-duration", type=float, default=None)
    ap.add_argument("--targets",
                    default="direct,nginx,haproxy,aiohttp-alone,naive,sidecar-aiohttp,sidecar,sidecar-core4,"
                            "sidecar-prod",
                    help="aiohttp-alone: aiohttp answering by itself (the ceiling of an aiohttp-based proxy); "
                         "sidecar-aiohttp: the sidecar with [outbound] client = \"aiohttp\", no plugins; "
                         "sidecar-core4: auth + rate_limit + circuit_breaker + headers")
    ap.add_argument("--sections", default="profile,filters,workers,probes",
                    help="besides the targets: profile (per-layer py-spy), filters (per-filter end-to-end "
                         "A/B), workers (workers = 2 next to nginx with 2 workers), probes (SSE, transfers, "
                         "idle connections)")
    ap.add_argument("--client", default="fast", choices=["fast", "aiohttp"],
                    help="the sidecar's upstream client ([outbound] client)")
    ap.add_argument("--server", default=None, choices=["fast", "aiohttp"],
                    help="the sidecar's listener ([outbound] server; default: the checkout's default). "
                         "When the checkout has the key, the other server is measured too, for comparison")
    ap.add_argument("--python-loadgen", action="store_true", help="ignore wrk even when installed")
    ap.add_argument("--no-chart", action="store_true")
    ap.add_argument("--compiled", action="store_true",
                    help="run the sidecar with its request path compiled by mypyc (setup.py), as the image does")
    args = ap.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    # SIGTERM (timeout, CI) must still stop every process the bench started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, args.idle * 2 + 2000))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < args.idle + 1000:
        print(f"note: open-file limit {want} caps the idle-connection probe", file=sys.stderr)
        args.idle = max(0, want - 1000)

    use_wrk = shutil.which("wrk") is not None and not args.python_loadgen
    has_nginx, has_haproxy = shutil.which("nginx") is not None, shutil.which("haproxy") is not None
    wanted = args.targets.split(",")
    sections = set(args.sections.split(",")) if args.sections else set()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    name = args.name or (time.strftime("%Y-%m-%d") + f"-{commit}" + ("-compiled" if args.compiled else "")
                         + ("-quick" if args.quick else ""))
    work = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    if args.compiled:
        global SIDECAR_SRC
        SIDECAR_SRC = compiled_copy(work)
    tables, skipped = chain_tables()
    chain, used, _, chain_config = production_chain()
    core4, core4_used, core4_skipped, core4_config = production_chain(CORE4)
    has_server_key = server_supported()
    server = args.server if has_server_key else None
    other_server: str | None = None
    default_server: str | None = None
    if has_server_key:
        from proxy.config import OutboundSettings

        default_server = OutboundSettings.model_fields["server"].default
        other_server = "aiohttp" if (server or default_server) != "aiohttp" else "fast"
    server_note = (f"sidecar listener: [outbound] server = {server or f'{default_server} (the default)'}"
                   f"; the other one ({other_server}) is measured on the passthrough row" if has_server_key else
                   "sidecar listener: this checkout has no [outbound] server key (aiohttp server)"
                   + (f"; --server {args.server} ignored" if args.server else ""))
    notes = [
        f"load generator: {'wrk -t1 -c%d' % args.connections if use_wrk else 'Python (bench/loadgen.py); it may be the bottleneck'}"
        + (" -- QUICK MODE: short rounds, a smoke run, not a measurement" if args.quick else ""),
        f"fixed-rate latency: Python open-loop generator at {args.rate:.0f} req/s, 16 connections, "
        "latency from the intended send time",
        f"machine: {platform.node()}, {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}",
        "sidecar request path: " + ("compiled with mypyc (--compiled; setup.py, as the container image)"
                                    if args.compiled else "pure Python (--compiled: as the container image)"),
        f"sidecar upstream client: {args.client}; {server_note}; production chain: {', '.join(used) or 'none'}"
        + (f" (skipped: {'; '.join(skipped)})" if skipped else "") + "; metrics + JSON access log to a file"
        + (f"; config.toml: {' '.join(chain_config.split())}" if chain_config else ""),
    ]
    procs: list[Proc] = []
    results: list[Result] = []
    extras: dict[str, dict] = {}

    def sidecar(tag: str, chain_text: str = "", access_log: bool = False, config: str = "", **kw) -> Proc:
        kw.setdefault("server", server)
        p = start_sidecar(work, tag, up, builtin.port, chain_text, access_log, args.client, config, **kw)
        procs.append(p)
        return p

    try:
        upstream, up_kind = start_upstream(work, has_nginx)
        procs.append(upstream)
        if up_kind.startswith("built-in"):
            builtin = upstream
        else:
            builtin = spawn("upstream-builtin", [sys.executable, "-m", "bench.upstream", str(bport := free_port())],
                            bport, work, {"PYTHONPATH": str(REPO)})
            procs.append(builtin)
        notes.insert(0, f"upstream: {up_kind}; SSE/transfer probes use the built-in upstream")
        up = upstream.port
        targets: list[tuple[str, Proc, str]] = []
        if "direct" in wanted:
            targets.append(("direct", upstream, f"http://127.0.0.1:{up}/json"))
        if "nginx" in wanted:
            if has_nginx:
                p = start_nginx_proxy(work, up)
                procs.append(p)
                targets.append(("nginx", p, f"http://127.0.0.1:{p.port}/bench/json"))
            else:
                notes.append("nginx: not installed (bench/setup.sh installs it); ratios to nginx are unavailable")
        if "haproxy" in wanted:
            if has_haproxy:
                p = start_haproxy(work, up)
                procs.append(p)
                targets.append(("haproxy", p, f"http://127.0.0.1:{p.port}/bench/json"))
            else:
                notes.append("haproxy: not installed (bench/setup.sh installs it)")
        if "aiohttp-alone" in wanted:
            port = free_port()
            p = spawn("aiohttp-alone", [sys.executable, "-m", "bench.baselines.aiohttp_alone", str(port)], port,
                      work, {"PYTHONPATH": str(REPO)})
            procs.append(p)
            targets.append(("aiohttp server alone (no proxying)", p, f"http://127.0.0.1:{port}/bench/json"))
        if "naive" in wanted:
            p = start_naive(work, up)
            procs.append(p)
            targets.append(("naive aiohttp", p, f"http://127.0.0.1:{p.port}/bench/json"))
        passthrough = prod = None
        if "sidecar-aiohttp" in wanted:
            p = start_sidecar(work, "sidecar-aiohttp", up, builtin.port, "", False, "aiohttp", server=server)
            procs.append(p)
            targets.append(("sidecar, aiohttp client", p, f"http://127.0.0.1:{p.port}/bench/json"))
        if "sidecar" in wanted:
            passthrough = sidecar("sidecar")
            targets.append(("sidecar", passthrough, f"http://127.0.0.1:{passthrough.port}/bench/json"))
            if other_server is not None:
                p = sidecar("sidecar-other-server", server=other_server)
                targets.append((f"sidecar, {other_server} server", p, f"http://127.0.0.1:{p.port}/bench/json"))
        if "sidecar-core4" in wanted:
            p = sidecar("sidecar-core4", core4, True, core4_config)
            targets.append(("sidecar + auth, rate_limit, circuit_breaker, headers", p,
                            f"http://127.0.0.1:{p.port}/bench/json"))
            if core4_skipped:
                notes.append(f"core chain: {', '.join(core4_used)} (skipped: {'; '.join(core4_skipped)})")
        if "sidecar-prod" in wanted:
            prod = sidecar("sidecar-prod", chain, True, chain_config)
            targets.append(("sidecar + prod chain", prod, f"http://127.0.0.1:{prod.port}/bench/json"))

        # Throughput as the issue measured it: interleaved rounds, medians.
        # One run per target in turn let a neighbour's burst during one
        # target's run move its ratio by a third (2026-11-29-49a181b: the
        # passthrough row at 19k req/s while its other runs made 22.5-23k).
        print(f"[bench] throughput: {args.rounds} interleaved rounds over {len(targets)} targets",
              file=sys.stderr, flush=True)
        tput = interleaved(targets, args, use_wrk, args.duration) if targets else {}
        # Latency likewise: a single fixed-rate run per target let one stall
        # (a neighbour, the load generator) decide a p99 (2026-11-30-fa04ea4:
        # the passthrough's one run had p99.9 20.6 ms, four runs right after
        # gave p99 within 0.05-0.2 ms of nginx). The median of interleaved
        # rounds, each round's p99 kept in the results.
        lats: dict[str, list[dict]] = {n: [] for n, _, _ in targets}
        for rnd in range(args.latency_rounds):
            for tname, _proc, url in (targets if rnd % 2 == 0 else list(reversed(targets))):
                print(f"[bench] {tname}: fixed-rate latency, round {rnd + 1} of {args.latency_rounds}",
                      file=sys.stderr, flush=True)
                lats[tname].append(asyncio.run(loadgen.fixed_rate(url, args.rate, args.rate_duration)))
        for tname, _proc, _url in targets:
            r = Result(tname)
            t = tput[tname]
            r.rps, r.cpu_us, r.errors = t["rps"], t["cpu_us"], t["errors"]
            r.runs = t["runs"]
            if tname == "direct":
                r.cpu_us = float("nan")  # the upstream's own cost, not a proxy's
            runs = lats[tname]
            r.p50_ms, r.p99_ms, r.p999_ms = (statistics.median(x[k] for x in runs)
                                             for k in ("p50_ms", "p99_ms", "p999_ms"))
            r.lat_runs = [x["p99_ms"] for x in runs]
            r.errors += sum(x["errors"] for x in runs)
            results.append(r)

        if "profile" in sections and use_wrk:
            extras["profile"] = {}
            for tname, sc in (("sidecar", passthrough), ("sidecar + prod chain", prod)):
                if sc is None:
                    continue
                print(f"[bench] {tname}: per-layer profile (py-spy)", file=sys.stderr, flush=True)
                url = f"http://127.0.0.1:{sc.port}/bench/json"
                extras["profile"][tname] = bench_profile.profile(
                    sc.popen.pid, lambda u=url: run_wrk(u, args.connections, args.profile_duration)["requests"],
                    args.profile_duration)

        if "filters" in sections:
            print("[bench] per-filter end-to-end cost (interleaved A/B)", file=sys.stderr, flush=True)
            ab = [("no plugins", sidecar("f-none"), "")]
            for fname, (policy_text, cfg) in tables.items():
                ab.append((fname, sidecar(f"f-{fname}", policy_text, False, cfg), ""))
            ab = [(n, p, f"http://127.0.0.1:{p.port}/bench/json") for n, p, _ in ab]
            extras["filters"] = interleaved(ab, args, use_wrk, args.duration)
            for _, p, _ in ab:
                p.stop()

        if "workers" in sections:
            print("[bench] workers = 2 next to nginx with 2 workers (interleaved)", file=sys.stderr, flush=True)
            rl = tables.get("rate_limit", ("", ""))[0]
            wt: list[tuple[str, Proc, str]] = []
            if has_nginx:
                for n in (1, 2):
                    p = start_nginx_proxy(work, up, n)
                    procs.append(p)
                    wt.append((f"nginx, {n} worker{'s' if n > 1 else ''}", p, f"http://127.0.0.1:{p.port}/bench/json"))
            for n in (1, 2):
                p = sidecar(f"w{n}-plain", workers=n)
                wt.append((f"sidecar, {n} worker{'s' if n > 1 else ''}", p, f"http://127.0.0.1:{p.port}/bench/json"))
                if rl:
                    p = sidecar(f"w{n}-rl", rl, True, workers=n)
                    wt.append((f"sidecar + rate_limit + access log, {n} worker{'s' if n > 1 else ''}", p,
                               f"http://127.0.0.1:{p.port}/bench/json"))
            extras["workers"] = interleaved(wt, args, use_wrk, args.duration)
            for _, p, _ in wt:
                p.stop()
            if rl and shutil.which("valgrind") and shutil.which("callgrind_control"):
                # What the state shared between workers costs, apart from what two
                # processes on two shared cores cost each other: instructions per
                # request of the whole sidecar, 1 vs 2 workers (bench/instructions.py).
                from . import instructions

                print("[bench] workers = 1 vs 2 under callgrind (instructions per request)", file=sys.stderr,
                      flush=True)
                extras["workers_instr"] = {
                    n: instructions.count(work, up, SIDECAR_SRC or REPO, f"instr-w{n}", "rl", args.duration, n)[1]
                    for n in (1, 2)}

        probe = passthrough or prod
        if "probes" in sections and probe is not None:
            print("[bench] SSE, transfers, idle connections", file=sys.stderr, flush=True)
            extras["sse"] = {
                "direct": asyncio.run(loadgen.sse_ttfb(f"http://127.0.0.1:{builtin.port}/sse")),
                "sidecar": asyncio.run(loadgen.sse_ttfb(f"http://127.0.0.1:{probe.port}/b2/sse")),
            }
            size = args.transfer_mb * 1_000_000
            base_rss = probe.rss()
            with RssSampler(probe) as s:
                down = asyncio.run(loadgen.download(f"http://127.0.0.1:{probe.port}/b2/download?bytes={size}"))
            down["peak_rss_mb"], down["base_rss_mb"] = s.peak / 1e6, base_rss / 1e6
            with RssSampler(probe) as s:
                upl = asyncio.run(loadgen.upload(f"http://127.0.0.1:{probe.port}/b2/upload", size))
            upl["peak_rss_mb"], upl["base_rss_mb"] = s.peak / 1e6, base_rss / 1e6
            direct_down = asyncio.run(loadgen.download(f"http://127.0.0.1:{builtin.port}/download?bytes={size}"))
            extras["transfer"] = {"download": down, "upload": upl, "direct_download": direct_down}
            if args.idle:
                extras["idle"] = idle_probe(probe, args.idle)
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(work, ignore_errors=True)

    report = render(name, results, extras, notes, args)
    out = HERE / "results" / f"{name}.md"
    out.parent.mkdir(exist_ok=True)
    chart = None
    if not args.no_chart:
        chart = write_chart(out.with_suffix(".png"), results)
        if chart is not None:
            report += f"\n![throughput and latency per target]({chart.name})\n"
    out.write_text(report)
    (out.with_suffix(".json")).write_text(json.dumps(
        {"results": [r.__dict__ for r in results], "extras": extras, "notes": notes,
         "targets": targets_issue10(results, extras, args)}, indent=1, default=str))
    print(report)
    print(f"[bench] wrote {out.relative_to(REPO)}" + (f" and {chart.relative_to(REPO)}" if chart else ""),
          file=sys.stderr)
    return 0


def idle_probe(proc: Proc, n: int) -> dict:
    url = f"http://127.0.0.1:{proc.port}/bench/json"

    async def run() -> dict:
        before = proc.rss()
        clients = await loadgen.idle_connections(url, n)
        await asyncio.sleep(0.5)
        after = proc.rss()
        for c in clients:
            c.transport.abort()
        return {"connections": len(clients), "rss_before_mb": before / 1e6, "rss_after_mb": after / 1e6,
                "kb_per_connection": (after - before) / max(len(clients), 1) / 1e3}

    return asyncio.run(run())


def render(name: str, results: list[Result], extras: dict, notes: list[str], args) -> str:
    nginx = next((r for r in results if r.target == "nginx"), None)
    naive = next((r for r in results if r.target == "naive aiohttp"), None)
    lines = [f"# Bench results: {name}", "",
             "Single worker/process/thread per target; one sitting; "
             "the machine was shared with other test runs, so compare ratios, not absolute numbers. "
             f"req/s and CPU µs/req: medians of {args.rounds} interleaved rounds of {args.duration:g} s "
             "(every target in turn, the order reversed every other round); the latency columns: medians "
             f"of {args.latency_rounds} interleaved fixed-rate rounds (each round's p99 at the end).", ""]
    lines += [f"- {n}" for n in notes]
    lines += ["", "| target | req/s | x nginx | x naive | p50 ms | p99 ms | p99.9 ms | +p99 vs nginx ms | CPU µs/req | errors |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        xn = r.rps / nginx.rps if nginx else float("nan")
        xv = r.rps / naive.rps if naive else float("nan")
        dp = r.p99_ms - nginx.p99_ms if nginx else float("nan")
        lines.append(f"| {r.target} | {fmt(r.rps, 0)} | {fmt(xn)} | {fmt(xv)} | {fmt(r.p50_ms, 3)} | "
                     f"{fmt(r.p99_ms, 3)} | {fmt(r.p999_ms, 3)} | {fmt(dp, 3)} | {fmt(r.cpu_us, 1)} | {r.errors} |")
    if "sse" in extras:
        s = extras["sse"]
        lines += ["", "## SSE time to first event", "", "| path | p50 ms | p99 ms |", "|---|---:|---:|",
                  f"| direct | {fmt(s['direct']['p50_ms'], 3)} | {fmt(s['direct']['p99_ms'], 3)} |",
                  f"| through the sidecar | {fmt(s['sidecar']['p50_ms'], 3)} | {fmt(s['sidecar']['p99_ms'], 3)} |",
                  f"| added | {fmt(s['sidecar']['p50_ms'] - s['direct']['p50_ms'], 3)} | "
                  f"{fmt(s['sidecar']['p99_ms'] - s['direct']['p99_ms'], 3)} |"]
    if "transfer" in extras:
        t = extras["transfer"]
        lines += ["", f"## {args.transfer_mb} MB transfers through the sidecar", "",
                  "| transfer | MB/s | sidecar RSS before MB | peak RSS during MB |", "|---|---:|---:|---:|",
                  f"| download | {fmt(t['download']['mb_s'], 0)} | {fmt(t['download']['base_rss_mb'], 1)} | "
                  f"{fmt(t['download']['peak_rss_mb'], 1)} |",
                  f"| upload | {fmt(t['upload']['mb_s'], 0)} | {fmt(t['upload']['base_rss_mb'], 1)} | "
                  f"{fmt(t['upload']['peak_rss_mb'], 1)} |",
                  f"| download direct (reference) | {fmt(t['direct_download']['mb_s'], 0)} | | |"]
    if "idle" in extras:
        i = extras["idle"]
        lines += ["", "## Idle keep-alive client connections", "",
                  f"{i['connections']:,} connections held open by one client after one request each: sidecar RSS "
                  f"{fmt(i['rss_before_mb'], 1)} MB -> {fmt(i['rss_after_mb'], 1)} MB "
                  f"({fmt(i['kb_per_connection'], 1)} KB per connection)."]
    if "profile" in extras:
        lines += ["", "## Where the time goes, per layer (py-spy during a wrk run)", "",
                  "User CPU per request split by py-spy samples, charged to the innermost frame in a layer "
                  "(bench/profile.py); kernel = the process's system CPU per request.", "",
                  "| target | " + " | ".join(bench_profile.ORDER) + " | kernel | total µs/req | samples |",
                  "|---|" + "---:|" * (len(bench_profile.ORDER) + 3)]
        for tname, pr in extras["profile"].items():
            if "error" in pr:
                lines.append(f"| {tname} | {pr['error']} |")
                continue
            lay = pr["layers_us"]
            lines.append(f"| {tname} | " + " | ".join(fmt(lay[k], 1) for k in bench_profile.ORDER)
                         + f" | {fmt(lay['kernel'], 1)} | {fmt(pr['user_us'] + pr['system_us'], 1)} | {pr['samples']} |")
    if "filters" in extras:
        f = extras["filters"]
        base = f.get("no plugins")
        lines += ["", "## Each filter's end-to-end cost (wrk A/B, interleaved rounds)", "",
                  f"One sidecar per filter (its bench/chain.toml table alone, access log off) and one with no "
                  f"plugins, {args.rounds} rounds of {args.duration:g} s, order reversed every other round; medians.",
                  "\"added µs/req (1/throughput)\" is 10^6/req/s minus the same for no plugins: the time per "
                  "request of a saturated single-worker sidecar, the issue's end-to-end measure.",
                  "", "| filter | req/s | CPU µs/req | added CPU µs/req | added µs/req (1/throughput) | errors |",
                  "|---|---:|---:|---:|---:|---:|"]
        for n, v in f.items():
            added = v["cpu_us"] - base["cpu_us"] if base and n != "no plugins" else float("nan")
            wall = (1e6 / v["rps"] - 1e6 / base["rps"] if base and n != "no plugins" else float("nan"))
            lines.append(f"| {n} | {fmt(v['rps'], 0)} | {fmt(v['cpu_us'], 1)} | {fmt(added, 1)} | {fmt(wall, 1)} | "
                         f"{v['errors']} |")
    if "workers" in extras:
        w = extras["workers"]
        lines += ["", "## workers = 2 next to nginx with 2 workers (wrk A/B, interleaved rounds)", "",
                  "CPU µs/req counts every process of the target (the supervisor and its workers). "
                  "On a 2-core machine the load generator and the upstream share the cores.", "",
                  "| target | req/s | CPU µs/req | errors |", "|---|---:|---:|---:|"]
        for n, v in w.items():
            lines.append(f"| {n} | {fmt(v['rps'], 0)} | {fmt(v['cpu_us'], 1)} | {v['errors']} |")
        wi = extras.get("workers_instr")
        if wi:
            lines += ["", "The same rate_limit + access log route under callgrind (bench/instructions.py, "
                      "user-space instructions per request, every process of the sidecar summed): what the "
                      "state shared between workers costs (the rate-limit table in shared memory, "
                      "prometheus' multi-process files), without the two processes' effect on each other.", "",
                      "| workers | k instructions/request |", "|---|---:|"]
            for n, v in wi.items():
                lines.append(f"| {n} | {fmt(v / 1000, 1)} |")
    if any(len(r.lat_runs) > 1 for r in results):
        lines += ["", "## p99 of each fixed-rate round (ms; the table above has their median)", "",
                  "| target | " + " | ".join(f"round {i + 1}" for i in range(args.latency_rounds)) + " |",
                  "|---|" + "---:|" * args.latency_rounds]
        for r in results:
            lines.append(f"| {r.target} | " + " | ".join(fmt(x, 3) for x in r.lat_runs) + " |")
    targets = targets_issue10(results, extras, args)
    if targets:
        lines += ["", "## Issue 10 targets", "", "| target | asked | measured | |", "|---|---|---|---|"]
        for t in targets:
            lines.append(f"| {t['target']} | {t['asked']} | {t['measured']} | {t['verdict']} |")
        if args.quick:
            lines += ["", "Quick mode: short rounds on a shared machine; these verdicts are a smoke test, "
                          "not the measurement."]
    return "\n".join(lines) + "\n"


def targets_issue10(results: list[Result], extras: dict, args) -> list[dict]:
    """Issue 10's targets, each evaluated from this sitting: met / NOT met /
    not measured (with why)."""
    out: list[dict] = []

    def add(target: str, asked: str, measured: str, ok: bool | None, why: str = "", verdict: str = "") -> None:
        verdict = verdict or ("not measured" + (f" ({why})" if why else "") if ok is None
                              else ("met" if ok else "NOT met"))
        out.append({"target": target, "asked": asked, "measured": measured, "verdict": verdict})

    nginx, naive = _get(results, "nginx"), _get(results, "naive aiohttp")
    rows = (("passthrough", "sidecar", 0.45),
            ("auth + rate_limit + circuit_breaker + headers", "sidecar + auth, rate_limit, circuit_breaker, headers",
             0.30),
            ("full production chain (bench/chain.toml)", "sidecar + prod chain", 0.22))
    for label, tn, want in rows:
        r = _get(results, tn)
        if r is None or nginx is None:
            add(f"{label} vs nginx", f">= {want:.2f} x", "–", None, "target or nginx not run")
        else:
            x = r.rps / nginx.rps
            add(f"{label} vs nginx", f">= {want:.2f} x", f"{x:.3f} x ({r.rps:,.0f} / {nginx.rps:,.0f} req/s)",
                x >= want)
    r = _get(results, "sidecar")
    if r is None or naive is None:
        add("passthrough vs naive aiohttp", ">= 4 x", "–", None, "target or naive not run")
    else:
        x = r.rps / naive.rps
        add("passthrough vs naive aiohttp", ">= 4 x", f"{x:.2f} x", x >= 4.0)
    for label, tn in (("passthrough", "sidecar"),
                      ("auth + rate_limit + circuit_breaker + headers",
                       "sidecar + auth, rate_limit, circuit_breaker, headers"),
                      ("full production chain", "sidecar + prod chain")):
        r = _get(results, tn)
        if r is None or nginx is None:
            add(f"{label}: added p99 at {args.rate:.0f} req/s", "within 1 ms of nginx", "–", None, "not run")
        else:
            d = r.p99_ms - nginx.p99_ms
            add(f"{label}: added p99 at {args.rate:.0f} req/s", "within 1 ms of nginx",
                f"{d:+.3f} ms (p99 {r.p99_ms:.3f} vs {nginx.p99_ms:.3f})", d <= 1.0)
    if "sse" in extras:
        s = extras["sse"]
        d = s["sidecar"]["p50_ms"] - s["direct"]["p50_ms"]
        add("SSE first byte (p50)", "within 1 ms of direct", f"{d:+.3f} ms", d <= 1.0)
    else:
        add("SSE first byte (p50)", "within 1 ms of direct", "–", None, "probes not run")
    if "transfer" in extras:
        t = extras["transfer"]
        grow = max(t["download"]["peak_rss_mb"], t["upload"]["peak_rss_mb"]) - t["download"]["base_rss_mb"]
        # Constant: buffering the body would grow RSS by about the bytes moved;
        # allow 10% of them (at least 8 MB of allocator noise).
        bound = max(8.0, args.transfer_mb * 0.10)
        ok = grow <= bound and t["download"]["bytes"] == args.transfer_mb * 1_000_000 \
            and t["upload"]["status"] == 200
        add(f"{args.transfer_mb} MB down and up", f"constant memory (peak RSS growth <= {bound:g} MB)",
            f"+{grow:.1f} MB", ok)
    else:
        add("100 MB down and up", "constant memory", "–", None, "probes not run")
    if "idle" in extras:
        i = extras["idle"]
        ok = i["kb_per_connection"] < 5.0
        note = "" if i["connections"] >= 10000 else f" at {i['connections']:,} connections, not 10,000"
        add("10,000 idle client connections", "< 5 KB each",
            f"{i['kb_per_connection']:.2f} KB each{note}", ok if i["connections"] >= 10000 else None,
            "" if i["connections"] >= 10000 else "fewer connections than asked")
    else:
        add("10,000 idle client connections", "< 5 KB each", "–", None, "probes not run")
    wi = extras.get("workers_instr")
    shared = "shared metrics + rate-limit table: cost per request, workers = 2 vs 1 (rate_limit route, instructions)"
    if wi and 1 in wi and 2 in wi:
        x = wi[2] / wi[1]
        add(shared, "<= 1.10 x", f"{x:.3f} x ({wi[2] / 1000:.1f}k vs {wi[1] / 1000:.1f}k)", x <= 1.10)
    elif "workers" in extras:
        add(shared, "<= 1.10 x", "–", None, "no valgrind (bench/setup.sh installs it)")
    w = extras.get("workers")
    if w:
        one = w.get("sidecar + rate_limit + access log, 1 worker")
        two = w.get("sidecar + rate_limit + access log, 2 workers")
        plain1, plain2 = w.get("sidecar, 1 worker"), w.get("sidecar, 2 workers")
        ng1, ng2 = w.get("nginx, 1 worker"), w.get("nginx, 2 workers")
        if one and two:
            x = two["cpu_us"] / one["cpu_us"]
            layout = ", ".join(f"{name} {b['cpu_us'] / a['cpu_us']:.2f} x" for name, a, b in
                               (("no plugins", plain1, plain2), ("nginx", ng1, ng2)) if a and b)
            # Wall-clock CPU also counts what two busy processes on the two cores
            # wrk and the upstream share cost each other (the no-plugins route and
            # nginx show that part): reported, the row above is the target.
            add("CPU per request, workers = 2 vs 1 (rate_limit route, wall clock)", "(reported)",
                f"{x:.2f} x ({two['cpu_us']:.1f} vs {one['cpu_us']:.1f} µs); same layout: {layout}", None,
                verdict="context: includes the 2-core layout")
    return out


def _get(results: list[Result], name: str) -> Result | None:
    return next((r for r in results if r.target == name), None)


def write_chart(path: Path, results: list[Result]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib missing (pip install '.[bench]'): no chart", file=sys.stderr)
        return None
    names = [r.target for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.barh(names, [r.rps for r in results], color="#4c72b0")
    a.set_xlabel("requests/s (closed loop)")
    a.invert_yaxis()
    y = range(len(names))
    h = 0.27
    b.barh([i - h for i in y], [r.p50_ms for r in results], h, label="p50")
    b.barh(list(y), [r.p99_ms for r in results], h, label="p99")
    b.barh([i + h for i in y], [r.p999_ms for r in results], h, label="p99.9")
    b.set_yticks(list(y), names)
    b.invert_yaxis()
    b.set_xlabel("latency ms at a fixed rate")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
