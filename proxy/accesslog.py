"""One JSON line per request (orjson), written in batches off the request path."""

from __future__ import annotations

import asyncio
import sys
from typing import IO, Any

import orjson


class AccessLog:
    """Buffers lines and writes them at most every ``interval`` seconds, so a
    request never waits on a write to stdout."""

    def __init__(self, target: str, interval: float = 0.05) -> None:
        self.enabled = target != "off"
        self._own = False
        self._out: IO[bytes] | None = None
        if target == "stdout":
            self._out = sys.stdout.buffer
        elif target == "stderr":
            self._out = sys.stderr.buffer
        elif self.enabled:
            self._out = open(target, "ab")  # noqa: SIM115 - closed in close()
            self._own = True
        self._buf: list[bytes] = []
        self._interval = interval
        self._scheduled = False

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._buf.append(orjson.dumps(record) + b"\n")
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(self._interval, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._buf or self._out is None:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        try:
            self._out.write(data)
            self._out.flush()
        except (OSError, ValueError):  # closed pipe: dropping log lines beats dying
            pass

    def close(self) -> None:
        self.flush()
        if self._own and self._out is not None:
            self._out.close()
