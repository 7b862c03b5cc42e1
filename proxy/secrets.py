"""Secret references: ``env:NAME``, ``file:/path`` (and ``vault:path#key``, see the auth plugin).

A policy names a secret by reference; the resolved value is read through
``SecretRef.get()`` on the data plane, which never blocks: env and file
values are cached in memory and re-checked cheaply; slow sources (Vault)
refresh in the background. A reference that cannot resolve raises
SecretUnavailable (503 ``secret_unavailable``) and is never sent literally
or as an empty credential.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import SidecarError

REFERENCE_PREFIXES = ("env:", "file:", "vault:")


class SecretUnavailable(SidecarError):
    status, code, message = 503, "secret_unavailable", "a credential this route needs is unavailable"


def is_reference(value: str) -> bool:
    return value.startswith(REFERENCE_PREFIXES)


class SecretRef:
    """A resolved-on-demand secret. Subclasses implement ``_load``."""

    source = "literal"
    # False for sources ``sidecar validate`` does not contact (Vault).
    validate_offline = True

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

    def describe(self) -> dict[str, Any]:
        """For /admin/secrets: never the value."""
        return {"reference": self.raw, "source": self.source, "available": self.value is not None,
                "version": self.version,
                "age_seconds": None if self.updated is None else round(time.time() - self.updated, 3),
                "error": self.error}


class LiteralSecret(SecretRef):
    def __init__(self, raw: str) -> None:
        super().__init__(raw)
        self.value = raw
        self.updated = time.time()

    def describe(self) -> dict[str, Any]:
        return {"reference": "(literal)", "source": "literal", "available": True}


class EnvSecret(SecretRef):
    source = "env"

    def __init__(self, raw: str) -> None:
        super().__init__(raw)
        self.name = raw[len("env:"):]

    def get(self) -> str:
        value = os.environ.get(self.name)
        if not value:
            self.value, self.error = None, f"environment variable {self.name} is not set"
            raise SecretUnavailable(f"secret {self.raw} is unavailable: variable not set")
        if value != self.value:
            self.value, self.updated, self.error = value, time.time(), None
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


class SecretStore:
    """One per runtime: dedupes references and knows every source.

    Plugins call ``store.ref("env:X")`` at build time and ``ref.get()`` per
    request. Other sources register a factory by prefix (``register("vault:", f)``).
    """

    def __init__(self) -> None:
        self._refs: dict[str, SecretRef] = {}
        self._factories: dict[str, SecretFactory] = {"env:": EnvSecret, "file:": FileSecret}

    def register(self, prefix: str, factory: SecretFactory) -> None:
        self._factories[prefix] = factory

    def ref(self, raw: str) -> SecretRef:
        """The reference object for ``raw``; a non-reference is a literal value."""
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
        return [r for r in self._refs.values() if r.source != "literal"]

    def check(self) -> list[str]:
        """Warnings for references that do not resolve now (``sidecar validate``)."""
        out = []
        for r in self.refs():
            if not r.validate_offline:
                continue
            try:
                r.get()
            except SecretUnavailable:
                out.append(f"{r.raw}: does not resolve now ({r.error or 'unavailable'})")
        return out

    def known_values(self) -> list[str]:
        """Every resolved value, for scrubbing free text before it is logged."""
        return [r.value for r in self._refs.values() if r.value and r.source != "literal"]
