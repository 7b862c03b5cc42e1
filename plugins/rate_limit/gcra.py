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

import ctypes.util
import fcntl
import hashlib
import heapq
import logging
import math
import mmap
import os
import platform
import struct
import time
from typing import Literal
from dataclasses import dataclass
from typing import Any

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


def decide_one(tat: float, now: float, lim: LimitSpec, max_wait: float) -> tuple[bool, float, int, float, float]:
    """``decide`` for one limit, without the lists and the Decision:
    (admitted, wait, remaining, reset, new TAT) -- the same numbers; the new
    TAT is ``tat`` itself when refused (nothing to store)."""
    interval = lim.interval
    w = (tat if tat > now else now) + interval - lim.tolerance - now
    wait = w if w > EPS else 0.0
    if wait <= max_wait + EPS:
        at = now + wait
        nt = (tat if tat > at else at) + interval
        admitted = True
    else:
        at = now
        nt = tat if tat > at else at
        admitted = False
    left = math.floor((at + lim.tolerance - nt) / interval + EPS)
    return admitted, wait, left if left > 0 else 0, nt - at if nt > at else 0.0, nt if admitted else tat


class MemoryStore:
    """One process: a dict of key -> TAT. A key whose TAT has passed is the
    same as an absent one, so sweeping them changes no decision."""

    kind = "memory"
    shared = False
    sync: Literal[True] = True

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
        admitted, wait, rem, reset, nt = decide_one(tats.get(key, 0.0), now, lim, max_wait)
        if admitted:
            tats[key] = nt
            self._writes += 1
            if self._writes >= 4096:
                self._sweep(now)
        return admitted, wait, rem, reset

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
_SLOT_SIZE = _SLOT.size
_unpack, _pack = _SLOT.unpack_from, _SLOT.pack_into
lockf, LOCK_EX, LOCK_UN = fcntl.lockf, fcntl.LOCK_EX, fcntl.LOCK_UN
_KNOWN_MAX = 1 << 16                # key -> slot offsets a process remembers
_Q = struct.Struct("<Q")
_D = struct.Struct("<d")
_unpack_q, _unpack_d = _Q.unpack_from, _D.unpack_from
_CAS_TRIES = 16
# A TAT slot being claimed (a NaN no clock produces); seen under the table
# lock it is a claim whose process died midway, and the slot is reset.
_CLAIMING = 0x7FF8_5C5C_0000_0001
_SEQ_CST = 5


def _load_cas() -> tuple[Any, Any]:
    """(a cffi FFI, ``__atomic_compare_exchange_8`` from libatomic), or (None, None).

    Only on x86-64: its ordering (loads not reordered with loads, stores not
    with stores) is what the lock-free path relies on for its plain reads of
    the slot and the claimer's plain writes; elsewhere the slot lock is used.
    Through cffi, not ctypes: a call costs ~0.35 us against ~0.8 us, and the
    slot's words are read through cffi pointers instead of struct (issue 10)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, None
    try:
        import cffi  # type: ignore[import-untyped]  # no stubs; the few calls here are checked by tests

        ffi = cffi.FFI()
        ffi.cdef("_Bool __atomic_compare_exchange_8(void *ptr, void *expected, uint64_t desired, int, int);")
        lib = ffi.dlopen(ctypes.util.find_library("atomic") or "libatomic.so.1")
        return ffi, lib.__atomic_compare_exchange_8
    except (ImportError, OSError, AttributeError):
        return None, None


_FFI, _CAS = _load_cas()
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
    (key hash, TAT) slots in a memory-mapped file.

    A one-limit decision on a key whose slot this process already knows
    (``decide_one``, the common case) takes no lock: it reads the slot's TAT,
    checks the slot still holds the key's hash, decides, and stores the new
    TAT with a compare-and-swap (libatomic's ``__atomic_compare_exchange_8``
    through cffi), retrying when another worker got there first. Issue 10:
    with a lock per decision, two workers on one hot key (a sidecar's usual
    case: one local client) blocked each other whenever the holder was
    descheduled, ~+35 us and half the throughput per request measured, and
    ``flock`` on the whole table plus the general path had cost ~17 us a
    decision against ~1.4 us in one process. Where there is no libatomic or
    not x86-64, the same path locks the slot's 16 bytes with an fcntl record
    lock instead.

    Everything that may claim or evict a slot (a key new to this process, a
    slot taken over, several limits at once, ``peek``) holds an fcntl lock on
    the whole file (record locks: the kernel releases them if a worker dies
    holding one). A claim first swaps the slot's TAT to a CLAIMING marker, so
    a lock-free update racing it fails its swap (and retries, then finds the
    slot gone), then writes the new hash, then the TAT. Keys of several-limit
    groups are only ever decided under the whole-file lock (a group has one
    limit or several, for every request), so those writes stay plain.

    CLOCK_MONOTONIC is system-wide on Linux, so every worker's ``now`` agrees.
    A slot whose TAT has passed is free for reuse (an expired key equals a
    fresh one). Slots are never emptied, so a probe may stop at the first
    never-used slot. If all ``_PROBE`` slots of a neighbourhood hold live keys,
    the one closest to expiry is evicted (and a warning logged): that key
    starts fresh, the only way this store can admit more than the limit.
    """

    kind = "memory"
    shared = True
    sync: Literal[True] = True

    def __init__(self, path: str, slots: int = DEFAULT_SLOTS, *, atomic: bool | None = None) -> None:
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
        # key -> (hash, slot offset, and with the CAS cffi pointers to the
        # slot's TAT as uint64_t and as double) as last found; the slot is
        # checked to still hold the hash before each use.
        self._known: dict[str, tuple[int, int, Any, Any]] = {}
        # atomic=None: the lock-free path when this machine has it (tests force either).
        self._cas: Any = _CAS if atomic is None or atomic else None   # a cffi function, or None
        if atomic and _CAS is None:
            raise RuntimeError("no 8-byte compare-and-swap here (libatomic on x86-64, cffi)")
        if self._cas is not None:
            ffi = _FFI
            # The table as 8-byte words (released in close(): it pins the mapping).
            self._words: Any = ffi.from_buffer("uint64_t[]", self.mm)
            # [0]: the expected TAT, [1]: the new one; written as doubles, passed as bits.
            self._scratch: Any = ffi.new("uint64_t[2]")
            self._scratch_d: Any = ffi.cast("double *", self._scratch)

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
            if tat != tat:
                # CLAIMING seen under the table lock: that claim's worker died midway.
                _D.pack_into(mm, off + 8, 0.0)
                tat = 0.0
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
        if self._cas is not None:
            # A lock-free update of the slot's old key may be under way: take
            # the slot from it with a swap; if that update won, the slot is
            # live again and the search starts over.
            exp = self._scratch
            tat_word = self._words + (free + 8) // 8
            exp[0] = tat_word[0]
            if not self._cas(tat_word, exp, _CLAIMING, _SEQ_CST, _SEQ_CST):
                return self._find(h, time.monotonic(), claim)
            _Q.pack_into(mm, free, h)      # the hash, then the TAT (x86-64 keeps store order)
            _D.pack_into(mm, free + 8, 0.0)
            return free
        _SLOT.pack_into(mm, free, h, 0.0)
        return free

    def decide_one(self, key: str, lim: LimitSpec, max_wait: float) -> tuple[bool, float, int, float]:
        """``decide`` for one key and one limit (MemoryStore.decide_one's
        contract): lock-free (or under the slot's lock) when the slot is known."""
        known = self._known.get(key)
        if known is not None:
            h, off, word, tat = known
            if word is not None:
                got = self._swap_one(h, word, tat, lim, max_wait)
            else:
                got = self._locked_one(h, off, lim, max_wait)
            if got is not None:
                return got
        # Unknown here, or the slot went to another key meanwhile: find or
        # claim it with the whole table locked.
        fd, mm = self.fd, self.mm
        h = _hash(key)
        lockf(fd, LOCK_EX)
        try:
            off = self._find(h, time.monotonic())
            if self._cas is None:
                now = time.monotonic()
                admitted, wait, rem, reset, nt = decide_one(_unpack_d(mm, off + 8)[0], now, lim, max_wait)
                if admitted:
                    _SLOT.pack_into(mm, off, h, nt)
                got = (admitted, wait, rem, reset)
                word = tat_d = None
            else:
                word = self._words + (off + 8) // 8
                tat_d = _FFI.cast("double *", word)
                # Another worker may update this slot lock-free meanwhile.
                got = None
                while got is None:
                    got = self._swap_one(h, word, tat_d, lim, max_wait)
        finally:
            lockf(fd, LOCK_UN)
        if len(self._known) >= _KNOWN_MAX:
            self._known.clear()   # client-chosen key values: bounded, refilled on use
        self._known[key] = (h, off, word, tat_d)
        return got

    def _swap_one(self, h: int, word: Any, tat_d: Any, lim: LimitSpec,
                  max_wait: float) -> tuple[bool, float, int, float] | None:
        """Decide on the slot whose TAT is at ``word`` (``tat_d``: the same
        address as a double) if it holds ``h``, storing by compare-and-swap;
        None when the slot is not (or no longer) that key's, or is being claimed."""
        cas = self._cas
        exp, exp_d = self._scratch, self._scratch_d
        for _ in range(_CAS_TRIES):
            # The TAT, then the hash: a claim writes the hash before the TAT.
            tat = tat_d[0]
            # A NaN is the CLAIMING marker (no clock gives one).
            if tat != tat or word[-1] != h:
                return None
            admitted, wait, rem, reset, nt = decide_one(tat, time.monotonic(), lim, max_wait)
            if not admitted:
                return admitted, wait, rem, reset
            # The TAT read, as bits (a double stored back keeps its bits), and the new one.
            exp_d[0] = tat
            exp_d[1] = nt
            if cas(word, exp, exp[1], _SEQ_CST, _SEQ_CST):
                return admitted, wait, rem, reset
        return None

    def _locked_one(self, h: int, off: int, lim: LimitSpec,
                    max_wait: float) -> tuple[bool, float, int, float] | None:
        fd, mm = self.fd, self.mm
        lockf(fd, LOCK_EX, _SLOT_SIZE, off)
        try:
            kh, tat = _unpack(mm, off)
            if kh != h:
                return None
            admitted, wait, rem, reset, nt = decide_one(tat, time.monotonic(), lim, max_wait)
            if admitted:
                _pack(mm, off, h, nt)
            return admitted, wait, rem, reset
        finally:
            lockf(fd, LOCK_UN, _SLOT_SIZE, off)

    def decide(self, keys: list[str], limits: tuple[LimitSpec, ...], max_wait: float) -> Decision:
        hashes = [_hash(k) for k in keys]
        lockf(self.fd, LOCK_EX)
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
            lockf(self.fd, LOCK_UN)

    def peek(self, keys: list[str], limits: tuple[LimitSpec, ...]) -> list[tuple[int, float]]:
        hashes = [_hash(k) for k in keys]
        lockf(self.fd, LOCK_EX)
        try:
            now = time.monotonic()
            offs = [self._find(h, now, claim=False) for h in hashes]
            tats = [_SLOT.unpack_from(self.mm, o)[1] if o >= 0 else 0.0 for o in offs]
            return peek(tats, now, limits)
        finally:
            lockf(self.fd, LOCK_UN)

    def close(self) -> None:
        self._known.clear()   # its pointers are into the mapping
        if self._cas is not None:
            _FFI.release(self._words)   # the cffi view pins the mapping
        try:
            self.mm.close()
        finally:
            os.close(self.fd)
