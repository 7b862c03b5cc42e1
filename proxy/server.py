"""Listeners and processes: serve one worker, or supervise several.

``workers = 1`` runs everything in this process. ``workers = N`` starts N
worker processes that each bind the listeners with SO_REUSEPORT; worker 0
also serves the admin listener, and metrics are aggregated across workers
through prometheus-client's multiprocess directory.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from prometheus_client.multiprocess import mark_process_dead

from .admin import make_admin_app
from .config import Settings, load_settings
from .errors import error_body
from .outbound import OutboundHandler
from .runtime import Runtime

log = logging.getLogger("sidecar")


class JsonErrorRequestHandler(RequestHandler):
    """aiohttp's protocol handler, answering parse errors with our JSON errors.

    Oversized header lines and too many headers become 431 (Envoy's choice);
    every other framing error (CL+TE, bad Content-Length, bad bytes) is 400.
    """

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        if isinstance(exc, LineTooLong) or (
                isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)):
            status, code, text = 431, "request_headers_too_large", "request headers exceed the limit"
        elif status == 400 or isinstance(exc, BadHttpMessage):
            status, code, text = 400, "bad_request", "malformed HTTP request"
        else:
            log.error("unhandled error in the HTTP layer", exc_info=exc)
            status, code, text = 500, "internal_error", "internal error"
        if status != 500:
            log.warning("rejected malformed request from %s: %s", request.remote, type(exc).__name__)
        resp = web.Response(status=status, body=error_body(code, text, None),
                            headers={"Content-Type": "application/json", "X-Sidecar-Error": code})
        resp.force_close()
        return resp


class SidecarServer(web.Server):
    def __call__(self) -> RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


def bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def parser_limits(rt: Runtime) -> dict[str, int]:
    """The HTTP parser's limits: the largest a route allows, so the per-route
    checks (with their JSON 431) decide below that."""
    limits = [rt.settings.limits] + [p.core.limits for p in rt.policies]
    size = max(lim.max_header_size for lim in limits)
    return {"max_line_size": max(size, 8190), "max_field_size": max(size, 8190),
            "max_headers": max(lim.max_headers for lim in limits) + 1}


class Sidecar:
    """One worker: the runtime and its listeners. Used by ``sidecar run`` and by tests."""

    def __init__(self, settings: Settings, worker_id: int = 0, admin: bool = True,
                 reuse_port: bool = False) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.with_admin = admin
        self.reuse_port = reuse_port
        self.runtime: Runtime | None = None
        self._runners: list[web.BaseRunner] = []
        self.ports: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        s = self.settings
        rt = self.runtime = Runtime(s, worker_id=self.worker_id)
        await rt.start()
        server = SidecarServer(OutboundHandler(rt), handler_cancellation=True,
                               access_log=None, **parser_limits(rt))
        runner = web.ServerRunner(server, shutdown_timeout=s.sidecar.drain_timeout, access_log=None)
        await self._serve("outbound", runner, s.outbound.host, s.outbound.port)
        if self.with_admin:
            admin = web.AppRunner(make_admin_app(rt), access_log=None,
                                  shutdown_timeout=min(2.0, s.sidecar.drain_timeout))
            await self._serve("admin", admin, s.admin.host, s.admin.port)
        for extra in rt.pm.hook.sidecar_listeners_start(runtime=rt, sidecar=self):
            if inspect.isawaitable(extra):
                await extra
        if s.sidecar.watch:
            self._tasks.append(asyncio.create_task(self._watch_policies()))

    async def serve_runner(self, name: str, runner: web.BaseRunner, host: str, port: int) -> int:
        """Start another listener (the inbound one, for instance) under this worker's drain."""
        return await self._serve(name, runner, host, port)

    async def _serve(self, name: str, runner: web.BaseRunner, host: str, port: int) -> int:
        await runner.setup()
        sock = bind(host, port, self.reuse_port)
        site = web.SockSite(runner, sock)
        await site.start()
        self._runners.append(runner)
        self.ports[name] = sock.getsockname()[1]
        return self.ports[name]

    async def _watch_policies(self) -> None:
        from watchfiles import awatch

        folder = self.settings.policies_dir
        try:
            async for _ in awatch(folder, debounce=200, step=50, recursive=False,
                                  watch_filter=lambda _c, p: p.endswith(".toml")):
                assert self.runtime is not None
                await self.runtime.reload()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("policy watcher stopped; SIGHUP and POST /admin/reload still reload")

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        """Drain: stop accepting, let in-flight requests finish (up to drain_timeout)."""
        for t in self._tasks:
            t.cancel()
        # Outbound first, admin last, so /health answers while draining.
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self.runtime is not None:
            await self.runtime.stop()


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format='{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":%(message)r}')


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _run_worker(settings: Settings, worker_id: int, admin: bool, reuse_port: bool) -> None:
    sidecar = Sidecar(settings, worker_id=worker_id, admin=admin, reuse_port=reuse_port)
    loop = asyncio.get_running_loop()
    await sidecar.start()
    assert sidecar.runtime is not None
    rt = sidecar.runtime
    loop.add_signal_handler(signal.SIGTERM, sidecar.request_stop)
    loop.add_signal_handler(signal.SIGINT, sidecar.request_stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(rt.reload()))
    log.info("worker %d listening: %s", worker_id, sidecar.ports)
    await sidecar.wait()
    log.info("worker %d draining (up to %.1fs)", worker_id, settings.sidecar.drain_timeout)
    await sidecar.stop()


def worker_main(config_path: str | None, worker_id: int, admin: bool, reuse_port: bool) -> None:
    settings = load_settings(config_path)
    setup_logging(settings.logging.level)
    install_uvloop()
    asyncio.run(_run_worker(settings, worker_id, admin, reuse_port))


def run(config_path: str | None) -> int:
    """``sidecar run``: one worker in-process, or a supervisor of N workers."""
    settings = load_settings(config_path)
    setup_logging(settings.logging.level)
    workers = settings.sidecar.workers or os.cpu_count() or 1
    if workers == 1:
        install_uvloop()
        asyncio.run(_run_worker(settings, 0, True, False))
        return 0
    return supervise(config_path, workers, settings)


def supervise(config_path: str | None, workers: int, settings: Settings) -> int:
    """Start N workers sharing the listeners; forward SIGTERM/SIGHUP; restart crashed ones."""
    mp_dir = tempfile.mkdtemp(prefix="sidecar-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
    # Files the workers share for the sidecar's lifetime (the memory backend's
    # rate-limit table: one limit for the whole sidecar, not per worker).
    run_dir = tempfile.mkdtemp(prefix="sidecar-run-")
    os.environ["SIDECAR_RUN_DIR"] = run_dir
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, multiprocessing.process.BaseProcess] = {}
    stopping = False

    started: dict[int, float] = {}

    def start(i: int) -> None:
        started[i] = time.monotonic()
        p = ctx.Process(target=worker_main, args=(config_path, i, i == 0, True), name=f"sidecar-worker-{i}")
        p.start()
        procs[i] = p

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for p in procs.values():
            if p.pid:
                os.kill(p.pid, signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)
    for i in range(workers):
        start(i)
    code = 0
    try:
        while True:
            time.sleep(0.2)
            alive = {i: p for i, p in procs.items() if p.is_alive()}
            if stopping and not alive:
                break
            for i, p in list(procs.items()):
                if not p.is_alive() and not stopping:
                    log.error("worker %d exited with %s; restarting", i, p.exitcode)
                    # Its live gauges (sidecar_inflight_requests) would keep
                    # counting the requests it died with (issue 11, item 8).
                    mark_process_dead(p.pid, mp_dir)
                    if time.monotonic() - started[i] < 1.0:
                        time.sleep(1.0)  # crash loop: do not spin
                    start(i)
    finally:
        for p in procs.values():
            p.join(timeout=settings.sidecar.drain_timeout + 5)
            if p.exitcode not in (0, None):
                code = 1
        for f in Path(mp_dir).glob("*.db"):
            f.unlink(missing_ok=True)
        os.rmdir(mp_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
    return code
