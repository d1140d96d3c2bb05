"""stack/addrmap.py on its own: every address rule, a verdict for each (no sockets, no clock)."""

from __future__ import annotations

import ipaddress

import pytest

from slirpy.config import Config
from slirpy.stack import addrmap
from slirpy.stack.addrmap import DIAL, DNS, REFUSE, AddressMap, Verdict, unreach_code

CIDR9 = ipaddress.ip_network("10.9.0.0/16")


@pytest.mark.parametrize("proto", ["tcp", "udp", "icmp"])
def test_gateway_is_the_host_loopback(proto):
    m = AddressMap(Config())
    assert m.outbound(proto, 4, "10.0.2.2", 8080) == Verdict(DIAL, "127.0.0.1", 8080)
    assert m.outbound(proto, 6, "fd00::2", 8080) == Verdict(DIAL, "::1", 8080)
    m9 = AddressMap(Config(cidr=CIDR9))
    assert m9.outbound(proto, 4, "10.9.0.2", 22) == Verdict(DIAL, "127.0.0.1", 22)
    assert m9.outbound(proto, 4, "10.0.2.2", 22) == Verdict(DIAL, "10.0.2.2", 22)


def test_disable_host_loopback_refuses_the_gateway_net_unreachable():
    m = AddressMap(Config(disable_host_loopback=True))
    for fam, gw in ((4, "10.0.2.2"), (6, "fd00::2")):
        for proto in ("tcp", "udp"):
            assert m.outbound(proto, fam, gw, 80) == Verdict(
                REFUSE, reason="host_loopback_disabled", unreach="net")
        # the stack answers echo to the gateway itself: one that got here is dropped silently
        assert m.outbound("icmp", fam, gw, 0) == Verdict(
            REFUSE, reason="host_loopback_disabled", unreach=None)
    assert m.outbound("tcp", 4, "127.0.0.1", 80) == Verdict(DIAL, "127.0.0.1", 80)


def test_dns_address():
    m = AddressMap(Config())
    for fam, dns in ((4, "10.0.2.3"), (6, "fd00::3")):
        for proto in ("tcp", "udp"):
            assert m.outbound(proto, fam, dns, 53) == Verdict(DNS)
            assert m.outbound(proto, fam, dns, 54) == Verdict(REFUSE, reason="dns_address",
                                                              unreach="net")
        assert m.outbound("icmp", fam, dns, 0).kind == REFUSE
    off = AddressMap(Config(disable_dns=True))
    for fam, dns in ((4, "10.0.2.3"), (6, "fd00::3")):
        for proto, port in (("tcp", 53), ("udp", 53), ("udp", 54), ("icmp", 0)):
            assert off.outbound(proto, fam, dns, port) == Verdict(REFUSE, reason="dns_disabled",
                                                                  unreach=None)


def test_anything_else_is_dialled_as_it_is():
    m = AddressMap(Config(disable_host_loopback=True, disable_dns=True))
    for fam, dst in ((4, "192.0.2.1"), (4, "10.0.2.4"), (6, "2001:db8::1"), (6, "fd00::4")):
        assert m.outbound("udp", fam, dst, 9) == Verdict(DIAL, dst, 9)


def test_a_policy_sees_the_guest_address_first_and_its_verdict_stands():
    seen = []

    def policy(proto, family, dst, dport):
        seen.append((proto, family, dst, dport))
        if dport == 5432:
            return None
        return addrmap.refuse("policy_rule_1", "admin")

    m = AddressMap(Config(), policy=policy)
    assert m.outbound("tcp", 4, "10.0.2.2", 5432) == Verdict(DIAL, "127.0.0.1", 5432)
    assert m.outbound("tcp", 4, "10.0.2.2", 22) == Verdict(REFUSE, reason="policy_rule_1",
                                                          unreach="admin")
    assert m.outbound("udp", 6, "fd00::3", 53) == Verdict(REFUSE, reason="policy_rule_1",
                                                         unreach="admin")
    assert seen == [("tcp", 4, "10.0.2.2", 5432), ("tcp", 4, "10.0.2.2", 22),
                    ("udp", 6, "fd00::3", 53)]


def test_unreach_codes():
    assert [unreach_code(k, 4) for k in ("net", "host", "admin", "port")] == [0, 1, 13, 3]
    assert [unreach_code(k, 6) for k in ("net", "host", "admin", "port")] == [0, 3, 1, 4]


def test_guest_visible_source():
    m = AddressMap(Config())
    assert m.guest_visible_source(4, "127.0.0.1") == "10.0.2.2"
    assert m.guest_visible_source(4, "127.8.9.10") == "10.0.2.2"
    assert m.guest_visible_source(6, "::1") == "fd00::2"
    assert m.guest_visible_source(4, "::ffff:127.0.0.1") == "10.0.2.2"
    assert m.guest_visible_source(4, "192.0.2.7") == "192.0.2.7"
    assert m.guest_visible_source(6, "2001:db8::9") == "2001:db8::9"
    assert m.guest_visible_source(6, "fe80::1%eth0") == "fe80::1"
    # a client of the other family, or an address that does not parse: the gateway
    assert m.guest_visible_source(4, "2001:db8::9") == "10.0.2.2"
    assert m.guest_visible_source(6, "192.0.2.7") == "fd00::2"
    assert m.guest_visible_source(4, "nonsense") == "10.0.2.2"
    assert AddressMap(Config(cidr=CIDR9)).guest_visible_source(4, "127.0.0.1") == "10.9.0.2"


def test_the_stack_uses_the_same_addresses():
    from slirpy.stack.stack import Stack
    cfg = Config(cidr=CIDR9)
    st = Stack(cfg)
    assert (st.gw4, st.dns4) == (bytes([10, 9, 0, 2]), bytes([10, 9, 0, 3]))
    assert st.gw6 == ipaddress.ip_address("fd00::2").packed
    assert st.dns6 == ipaddress.ip_address("fd00::3").packed
    assert st.ll6 == ipaddress.ip_address("fe80::2").packed


def test_gateway_and_dns_address_per_family():
    a = AddressMap(Config())
    assert (a.gateway(4), a.gateway(6)) == ("10.0.2.2", "fd00::2")
    assert (a.dns(4), a.dns(6)) == ("10.0.2.3", "fd00::3")


def test_icmp_to_the_dns_address_is_dropped_silently():
    """The stack answers pings to the DNS address itself; one that got here anyway is not a
    DNS query: refused without ICMP."""
    a = AddressMap(Config())
    for fam, dst in ((4, "10.0.2.3"), (6, "fd00::3")):
        assert a.outbound("icmp", fam, dst, 53) == addrmap.refuse("dns_address", None)
