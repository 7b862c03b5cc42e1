"""Who may use the outbound listener: ``[outbound] allowed_clients``.

The outbound listener injects credentials into whatever it forwards, so a
listener reachable from a network is an open proxy for every provider key it
holds. It must bind a loopback address, or list the peers allowed to call it;
then every other peer, loopback included unless listed, gets 403
``client_not_allowed`` (nginx's ``allow``/``deny``, Envoy's RBAC on
``remote_ip``). The server code calls ``ClientAllowList.allows(peer)`` once
per connection or request, before anything else.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .errors import SidecarError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientNotAllowed(SidecarError):
    status, code, message = 403, "client_not_allowed", "this client may not use the outbound listener"


def parse_networks(entries: Iterable[str]) -> list[Network]:
    """CIDRs or single addresses; a ValueError names the bad entry."""
    out: list[Network] = []
    for e in entries:
        try:
            net = ipaddress.ip_network(e.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{e!r} is not an IP address or CIDR (\"10.0.0.0/8\", \"::1\")") from None
        # Peers in ::ffff:0:0/96 are compared as IPv4 (allows()), so an entry
        # written that way (as a dual-stack socket shows the peer) is too.
        if net.version == 6 and net.prefixlen >= 96 and net.network_address.ipv4_mapped is not None:
            net = ipaddress.ip_network((net.network_address.ipv4_mapped, net.prefixlen - 96))
        out.append(net)
    return out


def is_loopback(host: str) -> bool:
    """Whether a listen host only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ClientAllowList:
    """The peers allowed on the outbound listener; ``None`` entries = everyone
    (the listener is on loopback, where position is the control)."""

    __slots__ = ("_nets", "_seen")

    def __init__(self, entries: list[str] | None) -> None:
        self._nets = None if entries is None else parse_networks(entries)
        # Peers are few (the pod's own service, a node's agents): remember answers.
        self._seen: dict[str, bool] = {}

    @property
    def restricted(self) -> bool:
        return self._nets is not None

    def allows(self, peer: str | None) -> bool:
        nets = self._nets
        if nets is None:
            return True
        if not peer:
            return False
        ok = self._seen.get(peer)
        if ok is None:
            try:
                ip = ipaddress.ip_address(peer.partition("%")[0])
            except ValueError:
                ok = False
            else:
                if ip.version == 6 and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
                ok = any(ip in n for n in nets)
            if len(self._seen) < 4096:
                self._seen[peer] = ok
        return ok

    def check(self, peer: str | None) -> None:
        """Raise ClientNotAllowed (403) for a peer not on the list."""
        if not self.allows(peer):
            raise ClientNotAllowed()
