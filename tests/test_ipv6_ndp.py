"""IPv6 neighbour discovery and address learning in the stack, checked against scapy's decoding:
RA contents (prefix/A flag, router lifetime, MTU, RDNSS) and schedule, NA for our three
addresses, the guest's addresses learned from traffic/DAD/NA, destinations never dialled."""

from __future__ import annotations

from scapy.layers.inet import UDP
from scapy.layers.inet6 import (ICMPv6EchoRequest, ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6ND_RA,
                                ICMPv6ND_RS, ICMPv6NDOptDstLLAddr, ICMPv6NDOptMTU,
                                ICMPv6NDOptPrefixInfo, ICMPv6NDOptRDNSS, ICMPv6NDOptSrcLLAddr,
                                IPv6)
from scapy.layers.l2 import Ether

from slirpy.config import Config
from slirpy.stack import events, wire
from slirpy.stack.stack import MAX_GUEST6, Stack

GUEST_MAC = "02:11:22:33:44:55"
ROUTER_MAC = "52:55:0a:00:02:02"
GUEST_LL = "fe80::11:22ff:fe33:4455"


def eth(pkt, dst=ROUTER_MAC):
    return bytes(Ether(src=GUEST_MAC, dst=dst) / pkt)


def frames(s):
    return [Ether(bytes(f)) for f in s.frames_to_send(0.0)]


def check_icmp6_checksum(p, layer):
    ck = p[layer].cksum
    del p[layer].cksum
    assert Ether(bytes(p))[layer].cksum == ck


def check_ra(p, mtu=1500):
    assert p.src == ROUTER_MAC and p[IPv6].src == "fe80::2" and p[IPv6].hlim == 255
    ra = p[ICMPv6ND_RA]
    assert (ra.chlim, ra.M, ra.O, ra.routerlifetime) == (64, 0, 0, 1800)
    assert p[ICMPv6NDOptSrcLLAddr].lladdr == ROUTER_MAC
    assert p[ICMPv6NDOptMTU].mtu == mtu
    pi = p[ICMPv6NDOptPrefixInfo]
    assert (pi.prefix, pi.prefixlen, pi.L, pi.A) == ("fd00::", 64, 1, 1)
    assert pi.validlifetime == 86400 and pi.preferredlifetime == 14400
    rd = p[ICMPv6NDOptRDNSS]
    assert rd.dns == ["fd00::3"] and rd.lifetime == 1800 and rd.len == 3
    check_icmp6_checksum(p, ICMPv6ND_RA)


def test_ra_schedule_and_contents():
    s = Stack(Config(enable_ipv6=True, mtu=9000), now=100.0)
    assert s.get_timer() == 100.0
    sent_at = []
    now = 100.0
    for _ in range(5):
        now = s.get_timer()
        s.handle_timer(now)
        fs = [p for p in frames(s) if ICMPv6ND_RA in p]
        assert len(fs) == 1
        p = fs[0]
        assert p.dst == "33:33:00:00:00:01" and p[IPv6].dst == "ff02::1"
        check_ra(p, mtu=9000)
        sent_at.append(now)
    assert sent_at == [100.0, 101.0, 103.0, 163.0, 223.0]


def test_no_ipv6_no_ra_no_answers():
    s = Stack(Config())
    s.handle_timer(0.0)
    assert s.get_timer() is None and s.frames_to_send(0.0) == []
    s.receive_frame(eth(IPv6(src=GUEST_LL, dst="ff02::2", hlim=255) / ICMPv6ND_RS()), 0.0)
    s.receive_frame(eth(IPv6(src=GUEST_LL, dst="ff02::1:ff00:2", hlim=255)
                        / ICMPv6ND_NS(tgt="fe80::2")), 0.0)
    assert s.frames_to_send(0.0) == [] and s.stats.dropped["ipv6_disabled"] == 2


def test_rs_answered_unicast_or_to_all_nodes():
    s = Stack(Config(enable_ipv6=True))
    s.receive_frame(eth(IPv6(src=GUEST_LL, dst="ff02::2", hlim=255) / ICMPv6ND_RS()
                        / ICMPv6NDOptSrcLLAddr(lladdr=GUEST_MAC), dst="33:33:00:00:00:02"), 0.0)
    (p,) = frames(s)
    assert p.dst == GUEST_MAC and p[IPv6].dst == GUEST_LL
    check_ra(p)
    s.receive_frame(eth(IPv6(src="::", dst="ff02::2", hlim=255) / ICMPv6ND_RS()), 0.0)
    (p,) = frames(s)
    assert p.dst == "33:33:00:00:00:01" and p[IPv6].dst == "ff02::1"
    # off-link (hop limit != 255) router solicitations are not ours to answer
    s.receive_frame(eth(IPv6(src=GUEST_LL, dst="ff02::2", hlim=64) / ICMPv6ND_RS()), 0.0)
    assert s.frames_to_send(0.0) == [] and s.stats.dropped["ndp_rs_not_link_local"] == 1


def test_ns_for_each_of_our_addresses():
    s = Stack(Config(enable_ipv6=True))
    for tgt in ("fe80::2", "fd00::2", "fd00::3"):
        snm = "ff02::1:ff00:" + tgt.rsplit(":", 1)[1]
        s.receive_frame(eth(IPv6(src=GUEST_LL, dst=snm, hlim=255) / ICMPv6ND_NS(tgt=tgt)
                            / ICMPv6NDOptSrcLLAddr(lladdr=GUEST_MAC)), 0.0)
        (p,) = frames(s)
        na = p[ICMPv6ND_NA]
        assert p.dst == GUEST_MAC and p[IPv6].src == tgt and p[IPv6].dst == GUEST_LL
        assert p[IPv6].hlim == 255 and (na.R, na.S, na.O, na.tgt) == (1, 1, 1, tgt)
        assert p[ICMPv6NDOptDstLLAddr].lladdr == ROUTER_MAC
        check_icmp6_checksum(p, ICMPv6ND_NA)
    # the guest's own address is never claimed (its DAD must succeed)
    s.receive_frame(eth(IPv6(src="::", dst="ff02::1:ff00:100", hlim=255)
                        / ICMPv6ND_NS(tgt="fd00::100")), 0.0)
    assert s.frames_to_send(0.0) == [] and s.stats.dropped["ndp_not_for_us"] == 1
    # a DAD probe for one of ours is answered to all-nodes, unsolicited
    s.receive_frame(eth(IPv6(src="::", dst="ff02::1:ff00:2", hlim=255)
                        / ICMPv6ND_NS(tgt="fd00::2")), 0.0)
    (p,) = frames(s)
    assert p[IPv6].dst == "ff02::1" and p[ICMPv6ND_NA].S == 0 and p[ICMPv6ND_NA].O == 1


def test_hostile_ndp_counted():
    s = Stack(Config(enable_ipv6=True))
    bad = [
        IPv6(src=GUEST_LL, dst="fd00::2", hlim=254) / ICMPv6ND_NS(tgt="fd00::2"),
        IPv6(src=GUEST_LL, dst="fd00::2", hlim=255) / ICMPv6ND_NS(tgt="ff02::1"),
        IPv6(src=GUEST_LL, dst="fd00::2", hlim=255) / ICMPv6ND_NS(tgt="fd00::2") / b"\x01\x00",
        IPv6(src=GUEST_LL, dst="fd00::2", hlim=255) / ICMPv6ND_NA(tgt="fd00::100") / b"\x02",
        IPv6(src=GUEST_LL, dst="fd00::2", hlim=1) / ICMPv6ND_NA(tgt="fd00::100"),
    ]
    for b in bad:
        s.receive_frame(eth(b), 0.0)
    assert s.frames_to_send(0.0) == []
    d = s.stats.dropped
    assert (d["ndp_ns_not_link_local"], d["ndp_ns_multicast_target"],
            d["ndp_option_zero_length"], d["ndp_option_truncated"],
            d["ndp_na_not_link_local"]) == (1, 1, 1, 1, 1)
    assert s.guest_addrs6() == []


def test_guest_addresses_learned_and_chosen():
    s = Stack(Config(enable_ipv6=True))
    assert s.guest_ipv6("fd00::100") == "fd00::100"  # nothing known yet: the default
    # DAD probe for an EUI-64 address, then traffic from a second address
    s.receive_frame(eth(IPv6(src="::", dst="ff02::1:ff33:4455", hlim=255)
                        / ICMPv6ND_NS(tgt="fd00::11:22ff:fe33:4455")), 0.0)
    assert s.guest_addrs6() == ["fd00::11:22ff:fe33:4455"]
    assert s.guest_ipv6("fd00::100") == "fd00::11:22ff:fe33:4455"
    s.receive_frame(eth(IPv6(src="fd00::abc", dst="fd00::2") / UDP(sport=1, dport=2)), 0.0)
    assert s.guest_ipv6("fd00::100") == "fd00::abc"
    # an unsolicited NA announces a third
    s.receive_frame(eth(IPv6(src=GUEST_LL, dst="ff02::1", hlim=255)
                        / ICMPv6ND_NA(tgt="fd00::def", R=0, S=0, O=1)), 0.0)
    assert s.guest_addrs6() == ["fd00::11:22ff:fe33:4455", "fd00::abc", "fd00::def"]
    # once the guest uses fd00::100, port forwards stick to it
    s.receive_frame(eth(IPv6(src="fd00::100", dst="fd00::2") / UDP(sport=1, dport=2)), 0.0)
    s.receive_frame(eth(IPv6(src="fd00::abc", dst="fd00::2") / UDP(sport=1, dport=2)), 0.0)
    assert s.guest_ipv6("fd00::100") == "fd00::100"
    assert s.guest_addrs6()[-1] == "fd00::abc"
    # link-local and our own addresses are never "the guest's"; the table is bounded
    for i in range(MAX_GUEST6 + 5):
        s.receive_frame(eth(IPv6(src="fd00::1:%x" % i, dst="fd00::2") / UDP(sport=1, dport=2)), 0)
    assert len(s.guest_addrs6()) == MAX_GUEST6
    assert s.stats.dropped["guest6_addr_forgotten"] > 0
    assert not {"fd00::2", "fd00::3", GUEST_LL} & set(s.guest_addrs6())


def test_mac_learned_from_link_local_then_no_solicit():
    s = Stack(Config(enable_ipv6=True))
    s.receive_frame(eth(IPv6(src=GUEST_LL, dst="ff02::2", hlim=255) / ICMPv6ND_RS()), 0.0)
    s.frames_to_send(0.0)
    s.send_udp(6, "fd00::2", 53, "fd00::100", 4000, b"x", 0.0)
    (p,) = frames(s)
    assert p.dst == GUEST_MAC and p[IPv6].dst == "fd00::100" and bytes(p[UDP].payload) == b"x"


def test_destinations_never_dialled():
    s = Stack(Config(enable_ipv6=True))
    for dst, reason in (("fd00::5", "ipv6_dst_in_guest_prefix"),
                        ("fe80::1", "ipv6_dst_link_local"),
                        ("::1", "ipv6_dst_reserved"), ("::", "ipv6_dst_reserved"),
                        ("::ffff:127.0.0.1", "ipv6_dst_reserved")):
        s.receive_frame(eth(IPv6(src="fd00::100", dst=dst) / UDP(sport=1, dport=2) / b"x"), 0)
        s.receive_frame(eth(IPv6(src="fd00::100", dst=dst) / ICMPv6EchoRequest()), 0)
        assert s.stats.dropped[reason] >= 2, reason
    assert [e for e in iter(s.next_event, None)] == []
    for dst in ("fd00::2", "fd00::3", "2001:db8::1", "fd01::1"):
        s.receive_frame(eth(IPv6(src="fd00::100", dst=dst) / UDP(sport=1, dport=2) / b"x"), 0)
    evs = [e for e in iter(s.next_event, None)]
    assert [e.dst for e in evs] == ["fd00::2", "fd00::3", "2001:db8::1", "fd01::1"]
    assert all(isinstance(e, events.UdpDatagram) for e in evs)


def test_wire_na_parser_against_scapy():
    pkt = ICMPv6ND_NA(tgt="fd00::100", R=0, S=1, O=1) / ICMPv6NDOptDstLLAddr(lladdr=GUEST_MAC)
    raw = bytes(IPv6(src=GUEST_LL, dst="fe80::2") / pkt)[40:]
    r = wire.parse_ndp_na_untrusted(0, 255, memoryview(raw)[8:])
    assert r[0] == bytes.fromhex("fd00" + "00" * 12 + "0100")
    assert r[1] == {2: bytes.fromhex(GUEST_MAC.replace(":", ""))}
    assert wire.parse_ndp_na_untrusted(0, 255, memoryview(raw)[8:20]) == "ndp_na_truncated"


def test_wire_ra_builder_without_rdnss():
    src = bytes.fromhex("fe80" + "00" * 13 + "02")
    ra = wire.build_ndp_ra(src, wire.ALL_NODES6, bytes.fromhex("525500000001"), 1500,
                           bytes.fromhex("fd00" + "00" * 14), router_lifetime=0)
    p = IPv6(src="fe80::2", dst="ff02::1", hlim=255, nh=58) / ICMPv6ND_RA(bytes(ra))
    p = IPv6(bytes(p))
    assert p[ICMPv6ND_RA].routerlifetime == 0 and ICMPv6NDOptRDNSS not in p
    assert p[ICMPv6NDOptPrefixInfo].prefix == "fd00::"
