"""An upstream connection that switched protocols (101): handed to the server side."""

from __future__ import annotations

from typing import TYPE_CHECKING

from multidict import CIMultiDict

if TYPE_CHECKING:
    from .conn import Conn

# Hop-by-hop names still dropped from a 101 (Upgrade and Connection are what it is about).
_DROP_101 = frozenset({b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
                       b"proxy-authenticate", b"content-length"})


class Upgraded:
    """The body of a 101 response: not bytes but the raw connection, whose
    bytes after the head (``tail``) and later are the upgraded protocol's.

    Iterating it yields nothing (a filter that reads a body sees an empty one);
    the server that proxies the upgrade takes ``conn`` over.
    """

    __slots__ = ("conn", "tail")

    def __init__(self, conn: "Conn") -> None:
        self.conn = conn
        self.tail = conn._tail
        conn._tail = b""

    def __aiter__(self) -> "Upgraded":
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration

    def close(self, ok: bool = False) -> None:
        self.conn.close()


def upgrade_headers(conn: "Conn") -> CIMultiDict[str]:
    return CIMultiDict([(k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                        for k, v in conn._headers if k.lower() not in _DROP_101])
