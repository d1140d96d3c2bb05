"""ICMP(v6) errors about the guest's echo requests: the error-queue cmsg parser and the error the
stack builds (checked with scapy)."""

from __future__ import annotations

import socket
import struct

from scapy.layers.inet import ICMP, IP, IPerror, ICMPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoRequest, IPerror6, IPv6
from scapy.layers.l2 import ARP, Ether

from slirpy.config import Config
from slirpy.icmp_nat import parse_icmp_errqueue
from slirpy.stack.stack import Stack

GUEST_MAC = "02:11:22:33:44:55"


def _ee(origin, typ, code, offender: bytes = b""):
    return struct.pack("=IBBBBII", 113, origin, typ, code, 0, 0, 0) + offender


def test_parse_icmp_errqueue():
    off6 = struct.pack("<HHI", socket.AF_INET6, 0, 0) + socket.inet_pton(socket.AF_INET6,
                                                                          "2001:db8::1") + b"\0" * 4
    assert parse_icmp_errqueue(_ee(3, 1, 3, off6), 6) == (1, 3, "2001:db8::1")
    assert parse_icmp_errqueue(_ee(3, 3, 0, off6), 6) == (3, 0, "2001:db8::1")
    off4 = struct.pack("<HH", socket.AF_INET, 0) + socket.inet_aton("192.0.2.9") + b"\0" * 8
    assert parse_icmp_errqueue(_ee(2, 3, 1, off4), 4) == (3, 1, "192.0.2.9")
    assert parse_icmp_errqueue(_ee(2, 11, 0), 4) == (11, 0, None)
    assert parse_icmp_errqueue(_ee(2, 3, 1, off4), 6) is None  # wrong origin for the family
    assert parse_icmp_errqueue(_ee(3, 2, 0, off6), 6) is None  # packet too big: not passed on
    assert parse_icmp_errqueue(_ee(1, 0, 0), 4) is None  # local origin
    for n in range(16):
        assert parse_icmp_errqueue(b"\x02" * n, 4) is None


def test_stack_builds_echo_errors():
    s = Stack(Config(enable_ipv6=True))
    s.receive_frame(bytes(Ether(src=GUEST_MAC, dst="52:55:0a:00:02:02") / ARP(
        op=2, hwsrc=GUEST_MAC, psrc="10.0.2.100", pdst="10.0.2.2")), 0.0)
    s.frames_to_send(0.0)
    s.send_icmp_echo_error(6, "2001:db8::1", "fd00::100", "2001:db8:3::1", 0x4343, 5, b"probe",
                           1, 0, 0.0)
    s.send_icmp_echo_error(4, "192.0.2.9", "10.0.2.100", "198.51.100.1", 0x77, 9, b"p4", 3, 1, 0.0)
    p6, p4 = [Ether(bytes(f)) for f in s.frames_to_send(0.0)]
    assert p6[IPv6].src == "2001:db8::1" and p6[IPv6].dst == "fd00::100"
    assert p6[ICMPv6DestUnreach].code == 0
    q = p6[IPerror6]
    assert (q.src, q.dst) == ("fd00::100", "2001:db8:3::1")
    req = ICMPv6EchoRequest(bytes(q.payload))
    assert (req.id, req.seq, req.data) == (0x4343, 5, b"probe")
    ck = p6[ICMPv6DestUnreach].cksum
    del p6[ICMPv6DestUnreach].cksum
    assert Ether(bytes(p6))[ICMPv6DestUnreach].cksum == ck
    assert p4[IP].src == "192.0.2.9" and p4[ICMP].type == 3 and p4[ICMP].code == 1
    assert (p4[IPerror].src, p4[IPerror].dst) == ("10.0.2.100", "198.51.100.1")
    assert (p4[ICMPerror].id, p4[ICMPerror].seq) == (0x77, 9)
