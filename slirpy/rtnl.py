"""The few rtnetlink requests `-c` needs, on a plain NETLINK_ROUTE socket: link up/MAC/MTU/txqueuelen
(and the IPv6 interface token), an IPv4 address, the default route.

Why not pyroute2: `import pyroute2` (even of one submodule: the package's __init__ runs first)
is 0.1-0.45 s here, and it ran in the helper between the tap appearing and getting its address.
These messages are small fixed structs (linux/rtnetlink.h, linux/if_link.h, linux/if_addr.h);
every request asks for an ACK and a refusal raises NetlinkError with the kernel's errno.
Nothing here is used per packet; the helper's child process is its only user.
"""

from __future__ import annotations

import os
import socket
import struct

NLMSG_ERROR = 2
RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 20, 24
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400

IFF_UP = 0x1
IFLA_ADDRESS, IFLA_MTU, IFLA_TXQLEN, IFLA_AF_SPEC = 1, 4, 13, 26
IFLA_INET6_TOKEN = 7
IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST = 1, 2, 4
RTA_GATEWAY, RTA_OIF = 5, 4
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1
NLA_F_NESTED = 0x8000

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBi")
_RTMSG = struct.Struct("=BBBBBBBBI")


class NetlinkError(OSError):
    """The kernel refused a request: .errno is its error code, .strerror what the step was."""


def attr(kind: int, payload: bytes) -> bytes:
    """One rtattr, padded to 4 bytes."""
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n & 3)


class Rtnl:
    """A NETLINK_ROUTE socket of the calling thread's network namespace (open it after setns)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, kind: int, flags: int, body: bytes, what: str) -> None:
        """Send one request with NLM_F_ACK and wait for its ACK (or raise NetlinkError)."""
        self.seq += 1
        seq = self.seq
        msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags,
                             seq, 0) + body
        self.sock.send(msg)
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size:
                    break
                if mtype == NLMSG_ERROR and mseq == seq:
                    (err,) = struct.unpack_from("=i", data, off + _NLMSGHDR.size)
                    if err:
                        raise NetlinkError(-err, f"{what}: {os.strerror(-err)}")
                    return
                off += (length + 3) & ~3

    def set_link(self, index: int, *, up: bool | None = None, mac: bytes | None = None,
                 mtu: int | None = None, txqlen: int | None = None,
                 ipv6_token: bytes | None = None, what: str = "set link") -> None:
        attrs = b""
        if mac is not None:
            attrs += attr(IFLA_ADDRESS, mac)
        if mtu is not None:
            attrs += attr(IFLA_MTU, struct.pack("=I", mtu))
        if txqlen is not None:
            attrs += attr(IFLA_TXQLEN, struct.pack("=I", txqlen))
        if ipv6_token is not None:
            inet6 = attr(IFLA_INET6_TOKEN, ipv6_token)
            attrs += attr(IFLA_AF_SPEC | NLA_F_NESTED,
                          attr(socket.AF_INET6 | NLA_F_NESTED, inet6))
        flags = change = 0
        if up is not None:
            change = IFF_UP
            flags = IFF_UP if up else 0
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change) + attrs
        self.request(RTM_NEWLINK, 0, body, what)

    def add_addr4(self, index: int, addr: bytes, prefixlen: int, what: str = "add address") -> None:
        """addr/prefixlen with the subnet's broadcast address (as slirp4netns's SIOCSIFADDR and
        SIOCSIFNETMASK leave it: `brd 10.0.2.255`)."""
        host_bits = (1 << (32 - prefixlen)) - 1
        brd = (int.from_bytes(addr, "big") | host_bits).to_bytes(4, "big")
        body = _IFADDRMSG.pack(socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
        body += attr(IFA_LOCAL, addr) + attr(IFA_ADDRESS, addr) + attr(IFA_BROADCAST, brd)
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body, what)

    def add_default_route4(self, index: int, gateway: bytes, what: str = "add route") -> None:
        body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT,
                           RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
        body += attr(RTA_GATEWAY, gateway) + attr(RTA_OIF, struct.pack("=i", index))
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body, what)
