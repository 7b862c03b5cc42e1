"""User-space instructions per request of checkouts, counted by callgrind.

    python -m bench.instructions plain 10 /tmp/base=before .=after
    python -m bench.instructions rl 10 --workers 2 .=two

On these shared 2-core VMs a neighbour moves wrk's req/s by 5-10% from one
minute to the next, so a change worth 1-3% is invisible to wrk A/B unless it
runs for many rounds. Instructions do not move with the neighbours: the same
checkout counted twice agrees within ~0.1%. For each checkout (a directory
holding proxy/ and plugins/, e.g. from ``git archive``) this starts one
sidecar under ``valgrind --tool=callgrind`` (instrumentation off), in front of
one nginx upstream, warms it with wrk, counts only while ``wrk -t1 -c16``
runs for DURATION seconds, and prints the instructions per request.

KIND is ``plain`` (no plugins, access log off), ``core4`` (auth + rate_limit
+ circuit_breaker + headers), ``prod`` (the production chain of
bench/chain.toml with the JSON access log) or ``rl`` (rate_limit and the JSON
access log: the route of the bench's workers = 2 row).

``--workers N`` runs the sidecar with N workers (valgrind follows the spawned
worker processes; every process's count is summed, so the figure is the
instructions per request of the whole sidecar). Against ``--workers 1`` it
shows what the state shared between workers costs (the rate-limit table in
shared memory, prometheus' multi-process files) apart from what two busy
processes on two shared cores cost each other, which wrk's CPU µs includes.

Under valgrind the sidecar runs
~50x slower, so it batches fewer requests per loop pass than at full speed;
the counts rank changes, the wrk sittings give the speed. Kernel time
(syscalls, ~1/3 of a plain request) is not counted. Needs valgrind
(bench/setup.sh installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import run as br


def _wait_port(port: int, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the sidecar under valgrind did not listen on {port} within {timeout:.0f} s")


def _wait_listening(pid: int, port: int, workers: int, timeout: float = 300) -> list:
    """The sidecar's processes, once ``workers`` of them listen on ``port``
    (under valgrind the second worker may start long after the first)."""
    import psutil

    end = time.monotonic() + timeout
    while True:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
        listening = 0
        for q in tree:
            try:
                listening += any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                                 for c in q.net_connections("tcp"))
            except psutil.Error:
                pass
        if listening >= workers:
            return tree
        if time.monotonic() > end:
            raise RuntimeError(f"{listening} of {workers} workers listen on {port} after {timeout:.0f} s")
        time.sleep(1)


def _total(out: Path) -> int:
    """The instructions in the dump callgrind_control wrote (the last part)."""
    total = 0
    for f in out.parent.glob(out.name + "*"):
        for line in f.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total


def count(work: Path, upstream: int, repo: Path, label: str, kind: str, duration: float,
          workers: int = 1) -> tuple[int, float]:
    """(requests, instructions per request) for one checkout."""
    # The sidecar start_sidecar() runs to write the config runs that checkout;
    # REPO is restored for a caller that goes on (bench.run's workers section).
    saved, br.REPO = br.REPO, repo
    try:
        return _count(work, upstream, repo, label, kind, duration, workers)
    finally:
        br.REPO = saved


def _count(work: Path, upstream: int, repo: Path, label: str, kind: str, duration: float,
           workers: int) -> tuple[int, float]:
    chain, config, log = "", "", False
    if kind == "prod":
        chain, _, _, config = br.production_chain()
        log = True
    elif kind == "core4":
        chain, _, _, config = br.production_chain(br.CORE4)
    elif kind == "rl":
        chain, _, _, config = br.production_chain(("rate_limit",))
        log = True
    # Writes the config and policies; the sidecar is then run under valgrind instead.
    p = br.start_sidecar(work, label, upstream, upstream, chain, log, "fast", config, workers=workers)
    port = p.port
    p.stop()
    d = work / label
    # One output file per process (%p): with workers, valgrind follows the spawned ones.
    out = work / f"callgrind.{label}.%p.out"
    vg = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no", "--trace-children=yes",
                           f"--callgrind-out-file={out}",
                           sys.executable, "-m", "proxy", "run", "--config", str(d / "config.toml")],
                          cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": str(repo), "BENCH_TOKEN": "bench-secret-token"})
    try:
        _wait_port(port)
        tree = _wait_listening(vg.pid, port, workers)
        url = f"http://127.0.0.1:{port}/bench/json"
        br.run_wrk(url, 16, 3)   # warm: connections, caches, the first-request paths
        pids = [str(q.pid) for q in tree]

        def control(*a: str) -> None:
            for pid in pids:
                # A helper process that is not Python (none today) would refuse: not an error.
                subprocess.run(["callgrind_control", *a, pid], capture_output=True)

        control("-i", "on")
        w = br.run_wrk(url, 16, duration)
        control("-i", "off")
        control("-d")
        time.sleep(2)
    finally:
        vg.terminate()
        vg.wait(60)
    n = w["requests"]
    total = sum(_total(work / f"callgrind.{label}.{pid}.out") for pid in pids)
    return n, total / max(n, 1)


def main(argv: list[str]) -> int:
    workers = 1
    if "--workers" in argv:
        i = argv.index("--workers")
        workers = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    if len(argv) < 3 or argv[0] not in ("plain", "core4", "prod", "rl"):
        print(__doc__)
        return 2
    for tool in ("valgrind", "callgrind_control", "wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: run bench/setup.sh")
            return 2
    kind, duration = argv[0], float(argv[1])
    work = Path(tempfile.mkdtemp(prefix="sidecar-instructions-"))
    up, _ = br.start_upstream(work, True)
    try:
        for item in argv[2:]:
            repo, _, label = item.partition("=")
            path = Path(repo).resolve()
            n, per = count(work, up.port, path, label or path.name, kind, duration, workers)
            print(f"{label or path.name:16s} {kind:6s} {n:7d} requests {per / 1000:8.1f} k instructions/request",
                  flush=True)
    finally:
        up.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
