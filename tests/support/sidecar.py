"""Start a real sidecar on free ports for a test: in-process through the kit
(proxy.testing), or as a subprocess (signals, workers) for this repository's tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from proxy.testing import RunningSidecar, free_port, session, start_sidecar, write_config

__all__ = ["REPO", "RunningSidecar", "SidecarProcess", "free_port", "session", "start_sidecar", "write_config"]

REPO = Path(__file__).resolve().parents[2]


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
            import psutil

            # The supervisor's spawned workers (and multiprocessing's tracker)
            # outlive a SIGKILLed parent: kill them too.
            try:
                children = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.Error:
                children = []
            self.proc.kill()
            self.proc.wait(10)
            for child in children:
                try:
                    child.kill()
                except psutil.Error:
                    pass

    def output(self) -> tuple[str, str]:
        assert self.proc is not None
        out, err = self.proc.communicate(timeout=30)
        return out.decode(), err.decode()
