"""GCRA decisions and the two memory stores (one process; several workers).

GCRA (the Generic Cell Rate Algorithm, ITU-T I.371) keeps one number per key:
the theoretical arrival time ``tat``. A limit of ``requests`` per ``per`` with
``burst`` has an emission interval ``T = per / requests`` and a tolerance
``burst * T``. A request at ``now`` conforms when
``max(tat, now) + T - burst*T <= now``; admitting it stores
``max(tat, now) + T``. A fresh key therefore takes ``burst`` requests at once
and then one every ``T``: smooth, with no fixed-window edge where twice the
limit gets through.

Several limits decide together: the request waits ``W`` = the longest of the
limits' waits. It is refused when ``W`` exceeds what the caller may wait (0 in
reject mode, ``max_wait`` in queue mode) and then nothing is stored. Otherwise
every limit stores ``max(tat, now + W) + T``: a queued request *reserves* its
slot at ``now + W``, so waiters are served first come, first served, across
workers and sidecars alike.
"""

from __future__ import annotations

import fcntl
import hashlib
import heapq
import logging
import math
import mmap
import os
import struct
import time
from dataclasses import dataclass

log = logging.getLogger("sidecar.rate_limit")

# Live keys one MemoryStore keeps at most (the shared table's slot count).
MAX_MEMORY_KEYS = 1 << 18

# Float noise must not turn "exactly on time" into a refusal.
EPS = 1e-9


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One compiled limit: ``requests`` per ``per`` seconds with ``burst``."""

    name: str
    requests: int
    per: float
    burst: int
    interval: float      # seconds between requests at the steady rate
    tolerance: float     # burst * interval

    @classmethod
    def make(cls, name: str, requests: int, per: float, burst: int) -> "LimitSpec":
        interval = per / requests
        return cls(name, requests, per, burst, interval, burst * interval)

    @property
    def interval_us(self) -> int:
        # Rounded up: integer microseconds in Redis must never admit more.
        return math.ceil(self.interval * 1_000_000)


@dataclass(slots=True)
class Decision:
    """The outcome for one request across all of its limits.

    ``wait``: seconds until the request may go (0: now). When ``admitted`` is
    False it is the Retry-After. ``refused_by`` is the index of the limit that
    needed the longest wait (-1 when none had to wait). ``remaining[i]`` and
    ``reset[i]`` are limit i's quota left and seconds until it is full again,
    as of the moment the request goes (or now, when refused).
    """

    admitted: bool
    wait: float
    refused_by: int
    remaining: list[int]
    reset: list[float]


def decide(tats: list[float], now: float, limits: tuple[LimitSpec, ...],
           max_wait: float) -> tuple[Decision, list[float] | None]:
    """The decision, and the new TATs to store (None: store nothing)."""
    wait = 0.0
    worst = -1
    for i, (lim, tat) in enumerate(zip(limits, tats)):
        w = (tat if tat > now else now) + lim.interval - lim.tolerance - now
        if w > wait + EPS:
            wait, worst = w, i
    admitted = wait <= max_wait + EPS
    at = now + wait if admitted else now
    new: list[float] | None = [] if admitted else None
    remaining = []
    reset = []
    for lim, tat in zip(limits, tats):
        nt = tat if tat > at else at
        if new is not None:
            nt += lim.interval
            new.append(nt)
        left = math.floor((at + lim.tolerance - nt) / lim.interval + EPS)
        remaining.append(left if left > 0 else 0)
        reset.append(nt - at if nt > at else 0.0)
    return Decision(admitted, wait, worst, remaining, reset), new


def peek(tats: list[float], now: float, limits: tuple[LimitSpec, ...]) -> list[tuple[int, float]]:
    """(remaining, seconds until full) per limit, consuming nothing."""
    out = []
    for lim, tat in zip(limits, tats):
        nt = tat if tat > now else now
        left = math.floor((now + lim.tolerance - nt) / lim.interval + EPS)
        out.append((max(left, 0), nt - now))
    return out


class MemoryStore:
    """One process: a dict of key -> TAT. A key whose TAT has passed is the
    same as an absent one, so sweeping them changes no decision."""

    kind = "memory"
    shared = False

    def __init__(self, max_keys: int = MAX_MEMORY_KEYS) -> None:
        self._tats: dict[str, float] = {}
        self._writes = 0
        self.max_keys = max_keys
        self._warned = -math.inf  # not 0.0: time.monotonic() counts from boot

    def decide(self, keys: list[str], limits: tuple[LimitSpec, ...], max_wait: float) -> Decision:
        now = time.monotonic()
        get = self._tats.get
        d, new = decide([get(k, 0.0) for k in keys], now, limits, max_wait)
        if new is not None:
            tats = self._tats
            for k, t in zip(keys, new):
                tats[k] = t
            self._writes += 1
            if self._writes >= 4096:
                self._sweep(now)
        return d

    def decide_one(self, key: str, lim: LimitSpec, max_wait: float) -> tuple[bool, float, int, float]:
        """``decide`` for one key and one limit, without the lists and the
        Decision: (admitted, wait, remaining, reset), the same numbers."""
        now = time.monotonic()
        tats = self._tats
        tat = tats.get(key, 0.0)
        interval = lim.interval
        w = (tat if tat > now else now) + interval - lim.tolerance - now
        wait = w if w > EPS else 0.0
        if wait <= max_wait + EPS:
            at = now + wait
            nt = (tat if tat > at else at) + interval
            tats[key] = nt
            self._writes += 1
            if self._writes >= 4096:
                self._sweep(now)
            admitted = True
        else:
            at = now
            nt = tat if tat > at else at
            admitted = False
        left = math.floor((at + lim.tolerance - nt) / interval + EPS)
        return admitted, wait, left if left > 0 else 0, nt - at if nt > at else 0.0

    def peek(self, keys: list[str], limits: tuple[LimitSpec, ...]) -> list[tuple[int, float]]:
        return peek([self._tats.get(k, 0.0) for k in keys], time.monotonic(), limits)

    def _sweep(self, now: float) -> None:
        self._writes = 0
        if len(self._tats) > 1024:
            self._tats = {k: t for k, t in self._tats.items() if t > now}
        if len(self._tats) > self.max_keys:
            # Key values come from clients (a rotating tenant header) and stay
            # live for a whole interval: past the cap, drop those nearest
            # expiry (SharedStore's rule; such a key starts fresh a little early).
            keep = heapq.nlargest(self.max_keys, self._tats.items(), key=lambda kv: kv[1])
            self._tats = dict(keep)
            if now - self._warned > 60:
                self._warned = now
                log.warning("rate-limit memory store over %d live keys: evicted those nearest expiry",
                            self.max_keys)

    def close(self) -> None:
        self._tats.clear()


_SLOT = struct.Struct("<Qd")        # 64-bit key hash, TAT (CLOCK_MONOTONIC seconds)
_HEADER = struct.Struct("<8sQ")     # magic, slot count
_MAGIC = b"SCRL0001"
DEFAULT_SLOTS = 1 << 18             # 4 MiB sparse file; ~262k live keys
_PROBE = 32


def _hash(key: str) -> int:
    # blake2b, not hash(): spawned workers have different PYTHONHASHSEEDs.
    # surrogateescape: a client's non-UTF-8 header byte arrives as a surrogate.
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little") | 1


class SharedStore:
    """Several worker processes of one sidecar: an open-addressing table of
    (key hash, TAT) slots in a memory-mapped file, with every decision made
    under ``flock`` so it reads and writes all of a request's limits atomically.

    CLOCK_MONOTONIC is system-wide on Linux, so every worker's ``now`` agrees.
    A slot whose TAT has passed is free for reuse (an expired key equals a
    fresh one). Slots are never emptied, so a probe may stop at the first
    never-used slot. If all ``_PROBE`` slots of a neighbourhood hold live keys,
    the one closest to expiry is evicted (and a warning logged): that key
    starts fresh, the only way this store can admit more than the limit.
    """

    kind = "memory"
    shared = True

    def __init__(self, path: str, slots: int = DEFAULT_SLOTS) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = _HEADER.size + slots * _SLOT.size
            st = os.fstat(fd)
            if st.st_size == 0:
                os.ftruncate(fd, size)
                os.pwrite(fd, _HEADER.pack(_MAGIC, slots), 0)
            magic, found = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
            if magic != _MAGIC:
                raise ValueError(f"{path}: not a rate-limit table")
            slots = found
            size = _HEADER.size + slots * _SLOT.size
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        self.fd = fd
        self.slots = slots
        self.mm = mmap.mmap(fd, size)
        self._warned = -math.inf  # not 0.0: time.monotonic() counts from boot

    def _find(self, h: int, now: float, claim: bool = True) -> int:
        """Offset of ``h``'s slot, claiming one if absent (call under the lock);
        -1 when absent and not ``claim``."""
        mm = self.mm
        unpack = _SLOT.unpack_from
        start = h % self.slots
        free = -1
        oldest = -1
        oldest_tat = math.inf
        for i in range(_PROBE):
            off = _HEADER.size + ((start + i) % self.slots) * _SLOT.size
            kh, tat = unpack(mm, off)
            if kh == h:
                return off
            if kh == 0:
                if free < 0:
                    free = off
                break
            if tat <= now:
                if free < 0:
                    free = off
            elif tat < oldest_tat:
                oldest, oldest_tat = off, tat
        if not claim:
            return -1
        if free < 0:
            free = oldest
            if now - self._warned > 60:
                self._warned = now
                log.warning("rate-limit table %s is full around a key; evicting the "
                            "entry nearest expiry (more live keys than slots?)", self.path)
        _SLOT.pack_into(mm, free, h, 0.0)
        return free

    def decide(self, keys: list[str], limits: tuple[LimitSpec, ...], max_wait: float) -> Decision:
        hashes = [_hash(k) for k in keys]
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            now = time.monotonic()
            offs = [self._find(h, now) for h in hashes]
            mm = self.mm
            tats = [_SLOT.unpack_from(mm, o)[1] for o in offs]
            d, new = decide(tats, now, limits, max_wait)
            if new is not None:
                for o, h, t in zip(offs, hashes, new):
                    _SLOT.pack_into(mm, o, h, t)
            return d
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def peek(self, keys: list[str], limits: tuple[LimitSpec, ...]) -> list[tuple[int, float]]:
        hashes = [_hash(k) for k in keys]
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            now = time.monotonic()
            offs = [self._find(h, now, claim=False) for h in hashes]
            tats = [_SLOT.unpack_from(self.mm, o)[1] if o >= 0 else 0.0 for o in offs]
            return peek(tats, now, limits)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        try:
            self.mm.close()
        finally:
            os.close(self.fd)
