"""Start a real sidecar (in-process or as a subprocess) on free ports for a test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp

from proxy.config import load_settings
from proxy.server import Sidecar

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp: Path, policies: dict[str, str], config: str = "", *,
                 outbound_port: int = 0, admin_port: int = 0, workers: int = 1,
                 outbound: str = "", sidecar: str = "", logging: str = "") -> Path:
    """Write config.toml and policies/<name>.toml under ``tmp``; returns config.toml's path.

    ``config`` is extra TOML appended to config.toml (tables not already written);
    ``outbound``, ``sidecar`` and ``logging`` are extra lines for those tables.
    """
    pol = tmp / "policies"
    pol.mkdir(parents=True, exist_ok=True)
    for name, text in policies.items():
        (pol / f"{name}.toml").write_text(textwrap.dedent(text))
    base = textwrap.dedent(f"""\
        [sidecar]
        service = "test"
        policies = "policies"
        workers = {workers}
        drain_timeout = "5s"
        watch = true
        {{sidecar}}
        [outbound]
        listen = "127.0.0.1:{outbound_port}"
        {{outbound}}

        [admin]
        listen = "127.0.0.1:{admin_port}"

        [logging]
        access_log = "{(tmp / 'access.log').as_posix()}"
        {{logging}}
        """)
    base = base.replace("{sidecar}", sidecar).replace("{outbound}", outbound).replace("{logging}", logging)
    extra = textwrap.dedent(config)
    if "[sidecar]" in extra or "[outbound]" in extra or "[admin]" in extra or "[logging]" in extra:
        raise ValueError("pass those tables through the keyword arguments")
    path = tmp / "config.toml"
    path.write_text(base + "\n" + extra)
    return path


class RunningSidecar:
    """An in-process sidecar; ``url`` is the outbound base, ``admin`` the admin base."""

    def __init__(self, sidecar: Sidecar, config_path: Path) -> None:
        self.sidecar = sidecar
        self.config_path = config_path
        self.dir = config_path.parent

    @property
    def runtime(self):  # noqa: ANN201
        return self.sidecar.runtime

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.ports['outbound']}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.ports['admin']}"

    def access_lines(self) -> list[dict]:
        import orjson

        self.runtime.accesslog.flush()
        path = self.dir / "access.log"
        if not path.exists():
            return []
        return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]

    async def wait_access_lines(self, n: int, timeout: float = 5.0) -> list[dict]:
        """The access-log lines once there are at least ``n`` (a line is written
        just after the response's last byte, so a client can be ahead of it)."""
        import asyncio

        end = time.monotonic() + timeout
        while True:
            lines = self.access_lines()
            if len(lines) >= n or time.monotonic() > end:
                return lines
            await asyncio.sleep(0.02)

    def write_policy(self, name: str, text: str) -> None:
        (self.dir / "policies" / f"{name}.toml").write_text(textwrap.dedent(text))


async def start_sidecar(tmp: Path, policies: dict[str, str], config: str = "", **kw: object) -> RunningSidecar:
    path = write_config(tmp, policies, config, **kw)  # type: ignore[arg-type]
    sc = Sidecar(load_settings(path))
    await sc.start()
    return RunningSidecar(sc, path)


class SidecarProcess:
    """``python -m proxy run`` in a subprocess, for signals and workers."""

    def __init__(self, config_path: Path, outbound_port: int, admin_port: int) -> None:
        self.config_path = config_path
        self.outbound_port = outbound_port
        self.admin_port = admin_port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.outbound_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 20.0) -> "SidecarProcess":
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(self.config_path)],
                                     cwd=self.config_path.parent, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise RuntimeError(f"sidecar exited {self.proc.returncode}: {err.decode()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.admin_port), timeout=0.2):
                    pass
                with socket.create_connection(("127.0.0.1", self.outbound_port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError("sidecar did not start listening in time")

    def listening_workers(self) -> int:
        """How many worker processes listen on the outbound port (SO_REUSEPORT)."""
        import psutil

        assert self.proc is not None
        count = 0
        # Children include multiprocessing's resource tracker: count listeners.
        for child in psutil.Process(self.proc.pid).children():
            try:
                conns = child.net_connections("tcp")
            except psutil.Error:
                continue
            count += any(c.laddr.port == self.outbound_port and c.status == psutil.CONN_LISTEN for c in conns)
        return count

    def wait_workers(self, n: int, timeout: float = 30.0) -> None:
        """Block until ``n`` workers listen (worker 0 may answer long before the others)."""
        end = time.monotonic() + timeout
        while self.listening_workers() < n:
            if time.monotonic() > end:
                raise RuntimeError(f"only {self.listening_workers()} of {n} workers listening")
            time.sleep(0.1)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> tuple[str, str]:
        assert self.proc is not None
        out, err = self.proc.communicate(timeout=30)
        return out.decode(), err.decode()


def session() -> aiohttp.ClientSession:
    """A client that sends exactly what the test says (no auto headers, no decompression)."""
    return aiohttp.ClientSession(auto_decompress=False)
