"""Where a guest's destination goes on the host: the one home of slirpy's address rules.

Pure (addresses in, a decision out; no sockets, no clock), shared by the three NATs
(nat.py, udp_nat.py, icmp_nat.py), port forwarding (portfwd.py) and the stack.

The rules, as slirp4netns/libslirp:
- the gateway (CIDR base + 2, fd00::2) is the host's loopback (127.0.0.1, ::1), unless
  ``--disable-host-loopback``: then it is refused with ICMP net unreachable (ICMPv6 no route);
- the DNS address (base + 3, fd00::3) port 53 is slirpy's DNS forwarder; another port is refused
  the same way; with ``--disable-dns`` nothing answers there at all (dropped, no ICMP);
- any other address is dialled as it is.
- a host client on the loopback appears to the guest as the gateway (``guest_visible_source``).

A decision is a ``Verdict``: DIAL (``host``, ``port``), DNS (the forwarder), or REFUSE (``reason``,
the counter and log key, and ``unreach``, how the guest is told: "net", "host", "admin"
(administratively prohibited, for an egress policy's "denied by rule N") or None for silence).
An egress policy plugs in as ``AddressMap(config, policy=fn)``: ``fn(proto, family, dst, dport)``
sees the guest's own destination first and returns a REFUSE verdict or None (go on); the callers
already act on every kind of verdict.
"""

from __future__ import annotations

import ipaddress
from typing import Callable, NamedTuple

from ..config import IPV6_DNS, IPV6_GATEWAY, IPV6_LINK_LOCAL_GATEWAY

DIAL, DNS, REFUSE = "dial", "dns", "refuse"

# ICMP destination-unreachable codes by unreach kind: (IPv4 code, ICMPv6 code), type 3 / type 1
UNREACH_CODES = {
    "net": (0, 0),     # net unreachable / no route to destination
    "host": (1, 3),    # host unreachable / address unreachable
    "admin": (13, 1),  # communication administratively prohibited (both)
    "port": (3, 4),    # port unreachable
}


class Verdict(NamedTuple):
    kind: str  # DIAL, DNS or REFUSE
    host: str = ""  # DIAL: the host address to dial
    port: int = 0  # DIAL: the host port
    reason: str = ""  # REFUSE: why (counter and log key), e.g. "host_loopback_disabled"
    unreach: str | None = None  # REFUSE: the ICMP answer's kind (UNREACH_CODES), None: silence


def dial(host: str, port: int) -> Verdict:
    return Verdict(DIAL, host, port)


def refuse(reason: str, unreach: str | None) -> Verdict:
    return Verdict(REFUSE, reason=reason, unreach=unreach)


TO_DNS = Verdict(DNS)


def unreach_code(unreach: str, family: int) -> int:
    """The ICMP (family 4) or ICMPv6 code of a destination unreachable of this kind."""
    return UNREACH_CODES[unreach][family == 6]


Policy = Callable[[str, int, str, int], "Verdict | None"]


class AddressMap:
    """The address rules of one Config. ``policy``: an egress policy's check, see the module
    docstring; None: everything not refused by the rules above is allowed."""

    def __init__(self, config, policy: Policy | None = None):
        self.config = config
        self.policy = policy
        self.gateway4 = str(config.gateway)
        self.dns4 = str(config.dns)
        self.gateway6 = str(IPV6_GATEWAY)
        self.dns6 = str(IPV6_DNS)
        self.link_local6 = str(IPV6_LINK_LOCAL_GATEWAY)
        # the packed forms, for the stack
        self.gateway4_packed = config.gateway.packed
        self.dns4_packed = config.dns.packed
        self.gateway6_packed = IPV6_GATEWAY.packed
        self.dns6_packed = IPV6_DNS.packed
        self.link_local6_packed = IPV6_LINK_LOCAL_GATEWAY.packed
        self._loopback_off = config.disable_host_loopback
        self._dns_off = config.disable_dns

    def gateway(self, family: int) -> str:
        return self.gateway4 if family == 4 else self.gateway6

    def dns(self, family: int) -> str:
        return self.dns4 if family == 4 else self.dns6

    def outbound(self, proto: str, family: int, dst: str, dport: int) -> Verdict:
        """Where the guest's ``proto`` ("tcp", "udp", "icmp") packet to ``dst``:``dport`` (the
        address as the stack gives it: str(ipaddress)) goes on the host."""
        if self.policy is not None:
            v = self.policy(proto, family, dst, dport)
            if v is not None:
                return v
        # ICMP: the stack answers echo to the gateway and DNS addresses itself; an echo that
        # got here anyway is refused silently
        if dst == self.gateway4 or dst == self.gateway6:
            if self._loopback_off:
                return refuse("host_loopback_disabled", None if proto == "icmp" else "net")
            return dial("127.0.0.1" if family == 4 else "::1", dport)
        if dst == self.dns4 or dst == self.dns6:
            if self._dns_off:
                return refuse("dns_disabled", None)  # nothing answers there, as slirp4netns
            if proto == "icmp":
                return refuse("dns_address", None)
            if dport != 53:
                return refuse("dns_address", "net")
            return TO_DNS
        return dial(dst, dport)

    def guest_visible_source(self, family: int, addr: str) -> str:
        """The address a host client at ``addr`` appears from inside a guest of ``family``: a
        client on the host's loopback (or one of the other family, or unparsable) appears as
        the gateway; any other keeps its own address."""
        gw = self.gateway4 if family == 4 else self.gateway6
        try:
            ip = ipaddress.ip_address(addr.split("%", 1)[0])
        except ValueError:
            return gw
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback or ip.version != family:
            return gw
        return str(ip)
