"""Listeners and processes: serve one worker, or supervise several.

``workers = 1`` runs everything in this process. ``workers = N`` starts N
worker processes that each bind the listeners with SO_REUSEPORT; worker 0
also serves the admin listener, and metrics are aggregated across workers
through prometheus-client's multiprocess directory. Workers may be pinned to
one CPU each (``[sidecar] cpu_affinity``, ``worker_cpus``).
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from prometheus_client.multiprocess import mark_process_dead

from .admin import make_admin_app
from . import compiled
from .admission import admission_for
from .config import Listener, Settings, load_settings
from .errors import LINGER, RequestTimeout, closing_error_response, error_body
from .fastserver.accept import Acceptor
from .http import new_request_id
from .logs import log_startup, setup_logging
from .outbound import OutboundHandler
from .runtime import Runtime

log = logging.getLogger("sidecar")


class JsonErrorRequestHandler(RequestHandler):
    """aiohttp's protocol handler, answering parse errors with our JSON errors,
    and answering 408 then closing when a request head does not arrive within
    ``header_timeout`` (issue 11 item 3; aiohttp has no such limit).

    Which head is due when (nginx's ``client_header_timeout``, Envoy's
    ``request_headers_timeout``, and the fast server, proxy/fastserver/):
    the first from accept; each later one on a keep-alive connection from
    its first byte, or from the end of the response before it when its first
    bytes came while that request was still being served (pipelining). Bytes
    that come while the latest request's body is still open are that body's,
    not a head's: a slow body is left to its own limits. While a head is
    open the keep-alive timer does not close the connection (nginx deletes
    it once the next request's first byte is read); a connection that stays
    silent after a response is closed at ``keepalive_timeout``, without 408.

    The cost is per read, not per byte: an integer compare and an
    ``is_eof()``; a read that ends a request also checks whether the next
    head began in it (``_next_head_follows``).

    Oversized header lines and too many headers become 431 (Envoy's choice);
    every other framing error (CL+TE, bad Content-Length, bad bytes) is 400.
    """

    def __init__(self, *args: Any, header_timeout: float | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        # Bytes of a request head arrived (or, before the first, the
        # connection was accepted) and the head is not complete yet.
        self._head_open = False
        # The latest request (message, body): while its body is open, the
        # bytes that come belong to it.
        self._last: tuple[Any, Any] | None = None
        self._lingering = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._header_timeout:
            # nginx: the first request head is due from accept.
            self._head_open = True
            self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # after a closing answer: read and dropped (errors.LINGER)
        if not self._header_timeout:
            super().data_received(data)
            return
        count = self._request_count
        last = self._last
        in_body = last is not None and not last[1].is_eof()
        fed_before = last[1].total_raw_bytes if in_body and last is not None else 0
        super().data_received(data)
        if self._upgraded or self._payload_parser is not None or self._close or self._force_close:
            return
        if self._request_count != count:
            # A head completed (start() takes it from the queue only after this returns).
            self._head_open = False
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            last = self._last = self._messages[-1] if self._messages else None
            if last is not None and last[1].is_eof() and _next_head_follows(data, last, None):
                self._open_head()
        elif in_body:
            assert last is not None
            if last[1].is_eof() and _next_head_follows(data, last, fed_before):
                self._open_head()
        elif data and not self._head_open:
            self._open_head()

    def _open_head(self) -> None:
        """The first bytes of the next request head came."""
        self._head_open = True
        if not self._request_in_progress and not self._messages:
            self._arm_head_timer()
        # else: behind a request still being served; timed from the end of
        # its response (finish_response), as the fast server does.

    async def finish_response(self, request: BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        if self._messages:
            # A declined upgrade's buffered bytes are parsed in there, not in data_received.
            self._last = self._messages[-1]
        if self._head_open and self.transport is not None:
            # The next head began before this response ended: it is due
            # header_timeout from now.
            self._arm_head_timer()
        return result

    def _arm_head_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        assert self._header_timeout
        self._header_timer = self._loop.call_later(self._header_timeout, self._head_late)

    def _process_keepalive(self) -> None:
        if self._head_open:
            # A head has begun: header_timeout decides (with 408), not the idle timer.
            self._keepalive_handle = None
            return
        super()._process_keepalive()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._last = None
        super().connection_lost(exc)

    def _head_late(self) -> None:
        self._header_timer = None
        transport = self.transport
        if transport is None or not self._head_open or self._force_close:
            return
        if self._request_in_progress or self._messages:
            return  # re-armed when the response before this head is written
        log.info("request head from %s did not arrive within %.1fs", self.peername, self._header_timeout)
        transport.write(closing_error_response(RequestTimeout(), new_request_id()))
        # Lingering close (errors.LINGER): FIN now, what the client still
        # sends is read and dropped, the socket closes on its EOF or LINGER.
        self._lingering = True
        try:
            transport.write_eof()
        except (OSError, RuntimeError):
            self.force_close()
            return
        self._loop.call_later(LINGER, self.force_close)

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
        # issue 11 item 8: a request id, as for every other sidecar error.
        rid = new_request_id()
        resp = web.Response(status=status, body=error_body(code, text, rid),
                            headers={"Content-Type": "application/json", "X-Sidecar-Error": code,
                                     "X-Request-ID": rid})
        resp.force_close()
        return resp


def _next_head_follows(data: bytes, last: tuple[Any, Any], fed_before: int | None) -> bool:
    """``data`` ended the latest request (message, body): did the first bytes
    of another head follow that end in it? Never True when nothing followed
    (a false 408 on an idle connection); False when it cannot tell, which
    leaves that head to keepalive_timeout, as an idle connection.

    ``fed_before``: the body's raw bytes before ``data`` (its head came
    earlier), or None (its head ended in ``data``)."""
    msg, body = last
    chunked = getattr(msg, "chunked", None)  # None: a parse error (_ErrInfo), closing anyway
    if chunked is None:
        return False
    if body is EMPTY_PAYLOAD or chunked:
        # Such a request ends with CRLF CRLF (llhttp is strict on requests),
        # and a head that has not ended has no CRLF CRLF in it. Under 4
        # bytes the CRLF CRLF may have begun in the read before.
        return len(data) >= 4 and not data.endswith(b"\r\n\r\n")
    size = body.total_raw_bytes  # the whole Content-Length, as sent (compressed or not)
    if fed_before is not None:
        return len(data) > size - fed_before
    # The head ends right before the body: the last CRLF CRLF that leaves
    # room for the body after it (one inside the body can only make the
    # answer "no").
    end = data.rfind(b"\r\n\r\n", 0, len(data) - size)
    return end >= 0 and len(data) - size - (end + 4) > 0


class SidecarServer(web.Server):
    """aiohttp's server with the sidecar's request handler; connections are
    accepted by an Acceptor (``max_connections``, proxy/fastserver/accept.py)."""

    def __init__(self, *args: Any, header_timeout: float | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._header_timeout = header_timeout
        self.acceptor: Acceptor | None = None

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if self.acceptor is not None:
            self.acceptor.opened()

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        if self.acceptor is not None:
            self.acceptor.closed()

    def __call__(self) -> RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, header_timeout=self._header_timeout,
                                       **self._kwargs)


class SidecarAppRunner(web.AppRunner):
    """An AppRunner (the admin listener) served by SidecarServer: JSON parse
    errors and the header timeout, as on the other listeners."""

    def __init__(self, app: web.Application, *, header_timeout: float, **kw: Any) -> None:
        super().__init__(app, **kw)
        self._header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return SidecarServer(plain.request_handler, request_factory=plain.request_factory,
                             header_timeout=self._header_timeout, **plain._kwargs)


def bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        # Which listener: "[Errno 98] Address already in use" alone names none.
        raise ListenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    except BaseException:
        sock.close()
        raise
    return sock


class ListenError(OSError):
    """A listener's address cannot be bound (in use, not ours): a clean exit, not a traceback."""


#: A worker's exit status when it cannot bind: restarting it would not help.
EXIT_CANNOT_LISTEN = 3


def parser_limits(rt: Runtime) -> dict[str, int]:
    """The HTTP parser's limits: the largest a route allows, so the per-route
    checks (with their JSON 431) decide below that."""
    limits = [rt.settings.limits] + [p.core.limits for p in rt.policies]
    size = max(lim.max_header_size for lim in limits)
    return {"max_line_size": max(size, 8190), "max_field_size": max(size, 8190),
            "max_headers": max(lim.max_headers for lim in limits) + 1}


def aiohttp_server(handler: Any, rt: Runtime, section: Any) -> web.ServerRunner:
    """An aiohttp-served listener (inbound; outbound with server = "aiohttp")
    with the JSON errors, the route-derived parser limits and [limits]'s
    client timeouts (max_connections: the Acceptor, see Sidecar._serve)."""
    header_timeout, keepalive, _ = rt.settings.limits.for_listener(section)
    server = SidecarServer(handler, handler_cancellation=True, access_log=None,
                           header_timeout=header_timeout, keepalive_timeout=keepalive,
                           **parser_limits(rt))
    return web.ServerRunner(server, shutdown_timeout=rt.settings.sidecar.drain_timeout, access_log=None)


def raise_fd_limit(wanted: int) -> None:
    """RLIMIT_NOFILE soft up to hard (issue 11 item 3), and a warning when the
    configured connections cannot all have a descriptor."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    # A client connection is one descriptor (its upstream connection comes
    # from a pool bounded by pool_size); keep some for files, Redis, pools.
    if wanted + 256 > soft:
        log.warning("max_connections = %d exceeds what the file-descriptor limit (%d) allows; "
                    "raise it (ulimit -n, LimitNOFILE) or lower max_connections", wanted, soft)


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
        self._fast: list[Any] = []
        self._acceptors: list[Acceptor] = []
        self.ports: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._runtime_stopped = False

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            # A failed start (a port in use) closes what it opened: no
            # "Unclosed client session" in the log (issue 11 item 8).
            await self.stop(drain=False)
            raise

    async def _start(self) -> None:
        s = self.settings
        rt = self.runtime = Runtime(s, worker_id=self.worker_id)
        await rt.start()
        limits = s.limits
        wanted = limits.for_listener(s.outbound)[2]  # the largest listener's cap
        if s.outbound.server == "fast":
            from .fastserver import start_fast

            handler = OutboundHandler(rt)
            admission = admission_for(rt, "outbound", websocket=True)
            fast = await start_fast(rt, handler.match, admission, s.outbound,
                                    bind(s.outbound.host, s.outbound.port, self.reuse_port))
            self._fast.append(fast)
            self.ports["outbound"] = fast.port
        else:
            await self._serve("outbound", aiohttp_server(OutboundHandler(rt), rt, s.outbound),
                              s.outbound.host, s.outbound.port)
        if self.with_admin:
            ht, ka, mc = limits.for_listener(s.admin)
            wanted = max(wanted, mc)
            admin = SidecarAppRunner(make_admin_app(rt), access_log=None, header_timeout=ht,
                                     keepalive_timeout=ka,
                                     shutdown_timeout=min(2.0, s.sidecar.drain_timeout))
            await self._serve("admin", admin, s.admin.host, s.admin.port)
        for extra in rt.pm.hook.sidecar_listeners_start(runtime=rt, sidecar=self):
            if inspect.isawaitable(extra):
                await extra
        raise_fd_limit(wanted)
        if s.sidecar.watch:
            self._tasks.append(asyncio.create_task(self._watch_policies()))

    async def serve_runner(self, name: str, runner: web.BaseRunner, host: str, port: int) -> int:
        """Start another listener (the inbound one, for instance) under this worker's drain."""
        return await self._serve(name, runner, host, port)

    async def _serve(self, name: str, runner: web.BaseRunner, host: str, port: int) -> int:
        await runner.setup()
        self._runners.append(runner)
        sock = bind(host, port, self.reuse_port)
        self.ports[name] = sock.getsockname()[1]
        server = runner.server
        if isinstance(server, SidecarServer):
            assert self.runtime is not None
            section = getattr(self.settings, name, None) or self.runtime.extra_settings.get(name)
            limit = (self.settings.limits.for_listener(section)[2] if isinstance(section, Listener)
                     else self.settings.limits.max_connections)
            server.acceptor = Acceptor(sock, server, limit, name)
            self._acceptors.append(server.acceptor)
        else:
            await web.SockSite(runner, sock).start()
        return self.ports[name]

    @staticmethod
    async def _drain_runner(runner: web.BaseRunner, timeout: float) -> None:
        """aiohttp's cleanup waits ``shutdown_timeout`` for in-flight handlers,
        then as long again after cancelling only their request bodies: cut
        the handlers at ``timeout`` so the whole drain ends on time."""
        server = runner.server
        cut = None
        if server is not None:
            def cut_handlers() -> None:
                for conn in list(server.connections):
                    task = getattr(conn, "_task_handler", None)
                    if task is not None and not task.done():
                        task.cancel()
            cut = asyncio.get_running_loop().call_later(timeout, cut_handlers)
        try:
            await runner.cleanup()
        finally:
            if cut is not None:
                cut.cancel()

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

    async def stop(self, drain: bool = True) -> None:
        """Drain (issue 11 item 4): every listener stops accepting at once, then
        all of them finish their in-flight requests concurrently, within
        ``drain_timeout``."""
        for t in self._tasks:
            t.cancel()
        timeout = self.settings.sidecar.drain_timeout if drain else 0.0
        for fast in self._fast:
            fast.stop_accepting()
        for acceptor in self._acceptors:
            acceptor.close()
        for runner in self._runners:
            for site in list(runner.sites):
                await site.stop()
        jobs = [fast.drain(timeout) for fast in self._fast]
        jobs += [self._drain_runner(runner, timeout) for runner in self._runners]
        if jobs:
            t0 = time.monotonic()
            await asyncio.gather(*jobs, return_exceptions=True)
            log.info("listeners drained in %.2fs", time.monotonic() - t0)
        self._fast.clear()
        self._acceptors.clear()
        self._runners.clear()
        if self.runtime is not None and not self._runtime_stopped:
            self._runtime_stopped = True
            await self.runtime.stop()


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
    await log_startup(rt, sidecar.ports)
    tune_gc()
    await sidecar.wait()
    log.info("worker %d draining (up to %.1fs)", worker_id, settings.sidecar.drain_timeout)
    t0 = time.monotonic()
    await sidecar.stop()
    log.info("worker %d stopped in %.2fs", worker_id, time.monotonic() - t0)


#: Net allocations of GC-tracked objects between two young collections
#: (CPython's default: 700). See tune_gc.
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the request path (issue 10).

    A chain with the access log on allocates a few tracked objects per
    request that live until the next flush (the buffered records), so with
    CPython's default threshold (700) the collector ran every ~140 requests,
    and each full collection walked the ~95,000 objects of the loaded
    configuration: 1.9 µs per request on bench/chain.toml, from gc.callbacks
    timings. So, once the worker has started:

    - ``gc.freeze()`` moves what exists now (modules, the runtime, the route
      table) out of the collector's sight; those objects are still freed by
      reference counting. Cyclic garbage among them (parts of the first
      configuration after a reload, a connection accepted during start-up)
      is never collected: a bounded, one-time amount.
    - A young-generation threshold of ``GC_YOUNG_THRESHOLD``: the per-request
      objects are freed by reference counting or with the access-log buffer
      long before that many pile up, so the collector does not run at all
      in steady state (0 collections over 100,000 requests measured, against
      ~600 before); real cyclic garbage (closed connections) is still
      collected once it reaches that many objects.
    """
    gc.collect()
    gc.freeze()
    _, mid, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, mid, old)


def worker_cpus(mode: str, workers: int, allowed: Sequence[int] | None) -> list[int | None]:
    """The CPU each of ``workers`` workers is pinned to (None: not pinned),
    given the CPUs this process may run on (None: unknown, not Linux).

    Issue 10: two unpinned workers on a 2-core machine, sharing it with the
    load generator and the upstream, cost ~1.2-1.4x one worker's CPU per
    request, varying from run to run; pinned, each keeps a core (and its
    caches) to itself and they cost ~1.1x (docs/performance.md, "workers >
    1"). The difference is the scheduler's placement, not our code. "auto"
    pins only when the sidecar may run on exactly as many CPUs as it has
    workers (``workers = 0``, or a cpuset
    sized for it): with more CPUs than workers, every sidecar on a node
    would crowd the same first CPUs. "on" pins round robin over the allowed
    CPUs whatever their number; "off" never pins.
    """
    if workers < 2 or not allowed or mode == "off" or (mode == "auto" and len(allowed) != workers):
        return [None] * workers
    cpus = sorted(allowed)
    return [cpus[i % len(cpus)] for i in range(workers)]


def allowed_cpus() -> list[int] | None:
    """The CPUs this process may run on (Linux), else None."""
    get = getattr(os, "sched_getaffinity", None)
    return sorted(get(0)) if get is not None else None


def worker_main(config_path: str | None, worker_id: int, admin: bool, reuse_port: bool,
                cpu: int | None = None) -> None:
    settings = load_settings(config_path)
    setup_logging(settings.logging)
    if cpu is not None:
        try:
            os.sched_setaffinity(0, {cpu})
            log.info("worker %d pinned to CPU %d", worker_id, cpu)
        except OSError as e:   # the cpuset changed since the supervisor looked: run unpinned
            log.warning("worker %d: cannot pin to CPU %d (%s); running unpinned", worker_id, cpu, e)
    install_uvloop()
    try:
        asyncio.run(_run_worker(settings, worker_id, admin, reuse_port))
    except ListenError as e:
        log.error("worker %d: %s", worker_id, e)
        raise SystemExit(EXIT_CANNOT_LISTEN) from None


def run(config_path: str | None) -> int:
    """``sidecar run``: one worker in-process, or a supervisor of N workers."""
    settings = load_settings(config_path)
    setup_logging(settings.logging)
    log.info("request path: %s", "compiled with mypyc" if compiled() else "pure Python")
    workers = settings.sidecar.workers or os.cpu_count() or 1
    if workers == 1:
        install_uvloop()
        try:
            asyncio.run(_run_worker(settings, 0, True, False))
        except ListenError as e:
            log.error("%s", e)   # one log line, as every other (issue 12), not a traceback
            return 1
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
    cpus = worker_cpus(settings.sidecar.cpu_affinity, workers, allowed_cpus())
    stopping = False

    started: dict[int, float] = {}

    def start(i: int) -> None:
        started[i] = time.monotonic()
        p = ctx.Process(target=worker_main, args=(config_path, i, i == 0, True, cpus[i]),
                        name=f"sidecar-worker-{i}")
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
                if not p.is_alive() and not stopping and p.exitcode == EXIT_CANNOT_LISTEN:
                    # Its address is taken by another program: stop, so the
                    # orchestrator sees a failed start instead of a restart loop.
                    log.error("worker %d cannot listen; stopping the sidecar", i)
                    stopping = True
                    for q in procs.values():
                        if q.is_alive() and q.pid:
                            os.kill(q.pid, signal.SIGTERM)
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
