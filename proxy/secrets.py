"""Secret references: ``env:NAME``, ``file:/path`` (``vault:`` and ``aws-sm:``: see the auth plugin).

A policy names a secret by reference; the resolved value is read through
``SecretRef.get()`` on the data plane, which never blocks: env values are
read once when the reference is loaded and again on every reload (issue 10:
not from ``os.environ`` per request; a running process's environment does
not change anyway), file values are cached and re-checked cheaply, slow
sources (Vault, AWS Secrets Manager) refresh in the background. A reference
that cannot resolve raises SecretUnavailable (503 ``secret_unavailable``) and
is never sent literally or as an empty credential.

A trailing ``?`` (``env:OPENAI_ORG?``) makes a reference optional: where a
value is injected (a header, a query parameter, a session token) it is
omitted when the secret is not set, instead of answering 503 (issue 12).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .errors import SidecarError

REFERENCE_PREFIXES = ("env:", "file:", "vault:", "aws-sm:")


class SecretUnavailable(SidecarError):
    status, code, message = 503, "secret_unavailable", "a credential this route needs is unavailable"


def is_reference(value: str) -> bool:
    return value.startswith(REFERENCE_PREFIXES)


class SecretRef:
    """A resolved-on-demand secret; each source subclasses it."""

    source = "literal"
    # False for sources ``sidecar validate`` does not read offline (Vault, AWS Secrets Manager).
    validate_offline = True
    optional = False

    def __init__(self, raw: str) -> None:
        self.raw = raw
        self.value: str | None = None
        self.version: str | None = None
        self.updated: float | None = None   # wall time of the last successful resolution
        self.error: str | None = None

    def get(self) -> str:
        """The current value; raises SecretUnavailable when there is none."""
        if self.value is None:
            raise SecretUnavailable(f"secret {self.raw} is unavailable")
        return self.value

    def get_optional(self) -> str | None:
        """``get()``, or None for an optional reference that is not set."""
        return self.get()

    def reread(self) -> None:
        """Re-read a source that is read once at load (env); others refresh themselves."""

    def describe(self) -> dict[str, Any]:
        """For /admin/secrets: never the value."""
        return {"reference": self.raw, "source": self.source, "available": self.value is not None,
                "version": self.version,
                "age_seconds": None if self.updated is None else round(time.time() - self.updated, 3),
                "error": self.error}


class RemoteSecret(SecretRef):
    """A value read in the background from a secret service (Vault, AWS Secrets
    Manager): served while its last successful read is younger than
    ``max_stale``, then unavailable until the service answers again."""

    def __init__(self, raw: str, max_stale: float) -> None:
        super().__init__(raw)
        self.max_stale = max_stale
        self.confirmed: float | None = None   # monotonic time of the last successful read
        self.tried = False
        # Set by the source when the service answered that the secret (or its
        # key) does not exist, cleared when a read finds it: only then is an
        # optional reference omitted. Not read yet or unreachable is an outage.
        self.absent = False

    def get(self) -> str:
        v = self.value
        if v is None:
            raise SecretUnavailable(f"secret {self.raw} is unavailable")
        if time.monotonic() - self.confirmed > self.max_stale:  # type: ignore[operator]
            raise SecretUnavailable(f"secret {self.raw} is unavailable: {self.source} unreachable past max_stale")
        return v

    def staleness(self) -> float:
        return 0.0 if self.confirmed is None else time.monotonic() - self.confirmed

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["available"] = self.value is not None and self.staleness() <= self.max_stale
        d["stale_seconds"] = round(self.staleness(), 3) if self.confirmed is not None else None
        return d


class OptionalSecret(SecretRef):
    """``<reference>?``: the same secret, omitted where it is injected when unset."""

    optional = True

    def __init__(self, raw: str, inner: SecretRef) -> None:
        super().__init__(raw)
        self.inner = inner
        self.source = inner.source

    def get(self) -> str:
        return self.inner.get()

    def get_optional(self) -> str | None:
        try:
            return self.inner.get()
        except SecretUnavailable:
            # No value at all: omitted. A value that went stale (its service
            # unreachable past max_stale) still fails closed, and so does a
            # remote one never read (not yet, or its service unreachable).
            # A remote one its service says does not exist (any more) is absent,
            # once its last value went stale.
            inner = self.inner
            if inner.absent if isinstance(inner, RemoteSecret) else inner.value is None:
                return None
            raise

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


class LiteralSecret(SecretRef):
    def __init__(self, raw: str) -> None:
        super().__init__(raw)
        self.value = raw
        self.updated = time.time()

    def describe(self) -> dict[str, Any]:
        return {"reference": "(literal)", "source": "literal", "available": True}


class EnvSecret(SecretRef):
    """Read when loaded and on every reload, never per request (issue 10)."""

    source = "env"

    def __init__(self, raw: str) -> None:
        super().__init__(raw)
        self.name = raw[len("env:"):]
        self.reread()

    def reread(self) -> None:
        value = os.environ.get(self.name)
        # As a file: secret is read: a Kubernetes Secret made from a file
        # usually ends with a newline, which no header may carry.
        value = value.strip() if value else value
        if not value:
            self.value, self.error = None, f"environment variable {self.name} is not set"
        elif value != self.value:
            self.value, self.updated, self.error = value, time.time(), None

    def get(self) -> str:
        value = self.value
        if value is None:
            raise SecretUnavailable(f"secret {self.raw} is unavailable: variable not set")
        return value


class FileSecret(SecretRef):
    """Re-read when the file changes (as Kubernetes mounted secrets rotate),
    checked at most every ``check_interval`` seconds."""

    source = "file"

    def __init__(self, raw: str, check_interval: float = 1.0) -> None:
        super().__init__(raw)
        self.path = Path(raw[len("file:"):])
        self.check_interval = check_interval
        # -inf, not 0.0: time.monotonic() counts from boot, so on a machine up
        # for less than check_interval a 0.0 skipped the first read.
        self._checked = -math.inf
        self._stamp: tuple[int, int, int] | None = None

    def get(self) -> str:
        now = time.monotonic()
        if now - self._checked >= self.check_interval:
            self._checked = now
            self._reload()
        return super().get()

    def _reload(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp and self.value is not None:
                return
            value = self.path.read_text().strip()
        except OSError as e:
            self.value, self._stamp, self.error = None, None, f"cannot read file: {e.strerror}"
            return
        if not value:
            self.value, self.error = None, "file is empty"
            return
        self.value, self._stamp, self.updated, self.error = value, stamp, time.time(), None
        self.version = str(stamp[0])


SecretFactory = Callable[[str], SecretRef]


async def stop_background(task: "asyncio.Task[Any] | None", executor: ThreadPoolExecutor | None) -> None:
    """Cancel a source's refresh task and drop its worker thread (at shutdown)."""
    if task is not None:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
    if executor is not None:
        executor.shutdown(wait=False, cancel_futures=True)


class RemoteSource:
    """What every background secret source (``vault:``, ``aws-sm:``) shares:
    the factory the SecretStore calls for each reference, one worker thread
    for the service's blocking client (hvac, botocore: never on the event
    loop), and a refresh loop that a reload adding a reference wakes at once.

    A subclass sets ``name``, makes its references in ``new_ref`` and reads
    them in ``_loop``; ``settings`` has ``refresh`` and ``startup_wait``.
    """

    name = "remote"

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.refs: list[Any] = []
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._closed = False

    def new_ref(self, raw: str) -> RemoteSecret:
        raise NotImplementedError

    def __call__(self, raw: str) -> Any:
        ref = self.new_ref(raw)
        self.refs.append(ref)
        if self._wake is not None:
            self._wake.set()   # a reload added a reference: read it now
        return ref

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in this source's thread."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sidecar-{self.name}")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def start(self) -> None:
        """Start the background refresh loop (idempotent; called on every policy load)."""
        if self._task is None and not self._closed:
            self._wake = asyncio.Event()
            self._lock = asyncio.Lock()
            self._task = asyncio.create_task(self._loop(), name=f"sidecar-{self.name}-refresh")

    async def _loop(self) -> None:
        raise NotImplementedError

    async def first_read(self) -> None:
        """Wait (up to ``startup_wait``) until every reference was tried once."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.settings.startup_wait
        while any(not r.tried for r in self.refs):
            if loop.time() > end or self._task is None or self._task.done():
                return
            await asyncio.sleep(0.02)

    def due(self, force: bool) -> list[Any]:
        """The references to read now: all when ``force``, else those never
        confirmed or confirmed most of a refresh interval ago."""
        now = time.monotonic()
        every = self.settings.refresh * 0.9
        return [r for r in self.refs if force or r.confirmed is None or now - r.confirmed >= every]

    async def close(self) -> None:
        self._closed = True
        await stop_background(self._task, self._executor)


class SecretStore:
    """One per runtime: dedupes references and knows every source.

    Plugins call ``store.ref("env:X")`` at build time and ``ref.get()`` per
    request. Other sources register a factory by prefix (``register("vault:", f)``).
    """

    def __init__(self) -> None:
        self._refs: dict[str, SecretRef] = {}
        self._factories: dict[str, SecretFactory] = {"env:": EnvSecret, "file:": FileSecret}
        # References asked for without '?' (their absence is a problem to report).
        self._required: set[str] = set()

    def register(self, prefix: str, factory: SecretFactory) -> None:
        self._factories[prefix] = factory

    def ref(self, raw: str) -> SecretRef:
        """The reference object for ``raw``; a non-reference is a literal value.

        ``<reference>?`` is an optional view of the same reference object.
        """
        if raw.endswith("?") and is_reference(raw):
            got = self._refs.get(raw)
            if got is None:
                got = self._refs[raw] = OptionalSecret(raw, self._ref(raw[:-1]))
            return got
        self._required.add(raw)
        return self._ref(raw)

    def _ref(self, raw: str) -> SecretRef:
        got = self._refs.get(raw)
        if got is not None:
            return got
        for prefix, factory in self._factories.items():
            if raw.startswith(prefix):
                got = factory(raw)
                break
        else:
            if is_reference(raw):
                raise ValueError(f"{raw.split(':', 1)[0]}: references need the plugin that provides them")
            got = LiteralSecret(raw)
        self._refs[raw] = got
        return got

    def refs(self) -> list[SecretRef]:
        """Every reference (an optional one listed once, under its plain form)."""
        return [r for r in self._refs.values() if r.source != "literal" and not r.optional]

    def optional_only(self, ref: SecretRef) -> bool:
        """True when ``ref`` is used only as ``<reference>?`` (its absence is no problem)."""
        return ref.raw not in self._required

    def reread(self) -> None:
        """Re-read the sources read once at load (env): called on every policy load."""
        for r in self.refs():
            r.reread()

    def check(self) -> list[str]:
        """Warnings for references that do not resolve now (``sidecar validate``)."""
        out = []
        for r in self.refs():
            if not r.validate_offline or self.optional_only(r):
                continue
            try:
                r.get()
            except SecretUnavailable:
                out.append(f"{r.raw}: does not resolve now ({r.error or 'unavailable'})")
        return out

    async def probe(self) -> list[str]:
        """Warnings for references of remote sources that cannot be read now:
        each source with a ``probe()`` coroutine reads its references once
        (``sidecar validate`` without ``--offline``)."""
        out = []
        for r in self.refs():
            probe = getattr(r, "probe", None)
            if probe is None or self.optional_only(r):
                continue
            why = await probe()
            if why is not None:
                out.append(f"{r.raw}: cannot be resolved now ({why})")
        return out

    def known_values(self) -> list[str]:
        """Every resolved value, for scrubbing free text before it is logged."""
        return [r.value for r in self._refs.values() if r.value and r.source != "literal"]
