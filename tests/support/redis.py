"""Redis servers of a test's own: one to stop, restart, freeze (SIGSTOP) and thaw,
and a three-master Redis Cluster. Never the shared Redis at 127.0.0.1:6379.

Without the binaries the tests skip loudly, unless SIDECAR_REQUIRE_REDIS=1
(CI, whose .ci/run installs them), where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.sidecar import free_port


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        reason = f"no {name} binary on PATH (apt-get install redis-server redis-tools)"
        if os.environ.get("SIDECAR_REQUIRE_REDIS") == "1":
            pytest.fail(f"SIDECAR_REQUIRE_REDIS=1 but {reason}")
        pytest.skip(f"REDIS TESTS SKIPPED: {reason}")
    return path


def answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def wait_answers(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not answers(port):
        if time.monotonic() > end:
            raise RuntimeError(f"redis-server on port {port} never answered")
        time.sleep(0.02)


class ThrowawayRedis:
    """A redis-server on a free port of this test's own, to stop, start, freeze and thaw."""

    def __init__(self, port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        self.binary = binary("redis-server")
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="sidecar-redis-")
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "ThrowawayRedis":
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", self.dir, *self.extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_answers(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.thaw()
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class LocalCluster:
    """Three masters, no replicas, on free ports in a temp dir; ``redis-cli --cluster create``.

    ``cluster-require-full-coverage no``: with a master gone, the other two
    keep serving their slots (the setting docs/scaling.md recommends).
    ``cluster-node-timeout`` is short so a dead master is noticed quickly.
    With no replicas a killed master "heals" only when it is started again on
    its port with its nodes.conf (``restart``): it rejoins with its slots.
    """

    def __init__(self, masters: int = 3) -> None:
        self.cli = binary("redis-cli")
        self.dir = Path(tempfile.mkdtemp(prefix="sidecar-cluster-"))
        self.nodes = []
        for _ in range(masters):
            port = free_port()
            d = self.dir / str(port)
            d.mkdir()
            self.nodes.append(ThrowawayRedis(port, extra=(
                # The bus port explicitly: the default (port + 10000) may be
                # taken, or past 65535 for a high free port.
                "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                "--cluster-config-file", str(d / "nodes.conf"),
                "--cluster-node-timeout", "1000", "--cluster-require-full-coverage", "no")))

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> "LocalCluster":
        for n in self.nodes:
            n.start()
        subprocess.run([self.cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
        self.wait_ok()
        return self

    def info(self, port: int) -> dict[str, str]:
        out = subprocess.run([self.cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True,
                             timeout=5).stdout
        return dict(line.split(":", 1) for line in out.split() if ":" in line)

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Until every node says cluster_state:ok and sees every slot served."""
        end = time.monotonic() + timeout
        while True:
            infos = [self.info(n.port) for n in self.nodes if n.proc is not None]
            if all(i.get("cluster_state") == "ok" and i.get("cluster_slots_ok") == "16384" for i in infos):
                return
            if time.monotonic() > end:
                raise RuntimeError(f"cluster not ok: {infos}")
            time.sleep(0.1)

    def slot_owner(self, key: str) -> ThrowawayRedis:
        """The node serving ``key``'s slot (from CLUSTER NODES: id, ip:port@bus, flags, ..., slot ranges)."""
        from redis.crc import key_slot

        slot = key_slot(key.encode())
        alive = next(n for n in self.nodes if n.proc is not None)
        out = subprocess.run([self.cli, "-p", str(alive.port), "cluster", "nodes"], capture_output=True,
                             text=True, timeout=5).stdout
        for line in out.splitlines():
            f = line.split()
            port = int(f[1].split("@")[0].rpartition(":")[2])
            for r in f[8:]:
                lo, _, hi = r.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no node serves slot {slot}")

    def stop(self) -> None:
        for n in self.nodes:
            n.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)
