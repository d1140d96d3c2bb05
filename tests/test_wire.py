"""Differential tests: scapy-built frames parsed by slirpy; slirpy-built frames parsed by scapy
and dpkt; checksums checked against a reference loop."""

from __future__ import annotations

import ipaddress
import os
import struct

import dpkt
import pytest
from hypothesis import example, given, settings, strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt
from scapy.layers.l2 import ARP, Ether

from slirpy.stack import wire
from slirpy.stack.checksum import checksum
from slirpy.stack.tcp_options import parse_tcp_options_untrusted

SET = settings(max_examples=200, deadline=None)
MAC_A, MAC_B = "02:00:00:00:00:01", "52:55:0a:00:02:02"
ip4 = st.integers(0, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i)))
ip6 = st.integers(0, 2**128 - 1).map(lambda i: str(ipaddress.IPv6Address(i)))
port = st.integers(0, 65535)
u32 = st.one_of(st.integers(2**32 - 70000, 2**32 - 1), st.integers(0, 2**32 - 1))
payload = st.binary(max_size=300)


def ref_checksum(d: bytes) -> int:
    if len(d) % 2:
        d += b"\0"
    s = sum((d[i] << 8) | d[i + 1] for i in range(0, len(d), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@SET
@given(st.binary(max_size=200))
def test_checksum_matches_reference_loop(d):
    assert checksum(d) == ref_checksum(d)


@pytest.mark.parametrize("d", [b"", b"\0", b"\0\0", b"\xff\xff", b"\xff\xff" * 9, b"\xff",
                               b"\x00\x01\xff\xfe", b"\xff\xfe\x00\x01"])
def test_checksum_edge_values(d):
    assert checksum(d) == ref_checksum(d)


@SET
@given(st.binary(max_size=60).map(lambda b: b[:len(b) & ~1]), st.binary(max_size=200),
       st.integers(0, 0xFFFF))
def test_checksum_continues_a_partial_sum(prefix, d, word):
    """RFC 1071 2(B)/(C): the sum is associative, so a pseudo-header's sum plus a protocol and
    length word (RFC 768, RFC 9293 3.1) handed in as ``initial`` gives the checksum of the
    whole; and a receiver summing data with the checksum in it gets 0xFFFF (4.1: "all ones")."""
    from slirpy.stack.checksum import ones_sum
    whole = prefix + word.to_bytes(2, "big") + d
    assert checksum(d, ones_sum(prefix) + word) == ref_checksum(whole)
    assert 0 <= ones_sum(d, ones_sum(prefix) + word) <= 0xFFFF
    padded = d + b"\0" * (len(d) & 1)
    ck = checksum(padded, ones_sum(prefix))
    assert ones_sum(padded + ck.to_bytes(2, "big"), ones_sum(prefix)) == 0xFFFF


def test_checksum_odd_length_pads_with_a_zero_byte():
    """RFC 1071 4.1: an odd trailing byte is the high byte of a last word padded with zero."""
    from slirpy.stack.checksum import ones_sum
    assert ones_sum(b"\x12") == 0x1200 and ones_sum(b"\x12\x34\x56") == 0x1234 + 0x5600
    assert ones_sum(b"\xff\xff\x01") == 0x0100  # 0xFFFF + 0x0100 folds to 0x0100
    assert ones_sum(b"") == 0 and ones_sum(b"\0\0") == 0  # nothing to add: zero, not "-0"
    assert ones_sum(b"\xff\xff") == 0xFFFF and ones_sum(b"\x00\x01", 0xFFFE) == 0xFFFF
    assert checksum(b"\x12") == 0xEDFF


def _mac(s):
    return bytes.fromhex(s.replace(":", ""))


@SET
@given(ip4, ip4, port, port, u32, u32, st.integers(0, 255), st.integers(0, 65535), payload,
       st.booleans())
def test_scapy_tcp4_parsed_by_slirpy(src, dst, sp, dp, sq, ak, flags, win, pl, opts):
    options = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (sq, ak)), ("WScale", 7)] if opts \
        else []
    raw = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=src, dst=dst, ttl=33, id=77)
                / TCP(sport=sp, dport=dp, seq=sq, ack=ak, flags=flags, window=win,
                      options=options) / pl)
    e = wire.parse_ethernet_untrusted(memoryview(raw))
    assert e[0] == _mac(MAC_B) and e[1] == _mac(MAC_A) and e[2] == 0x0800
    i = wire.parse_ipv4_untrusted(e[3])
    s, d, proto, ttl, ident, foff, more, data = i
    assert (str(ipaddress.IPv4Address(s)), str(ipaddress.IPv4Address(d))) == (src, dst)
    assert (proto, ttl, ident, foff, more) == (6, 33, 77, 0, False)
    t = wire.parse_tcp_untrusted(data, wire.pseudo_sum(4, s, d, 6, len(data)))
    assert not isinstance(t, str), t
    assert t[:6] == (sp, dp, sq, ak, flags, win)
    assert bytes(t[7]) == pl
    assert bytes(t[6]) == bytes(TCP(raw[34:]).options and raw[54:34 + (raw[46] >> 4) * 4])


@SET
@given(ip6, ip6, port, port, payload, st.integers(0, 3))
def test_scapy_udp6_with_ext_headers_parsed(src, dst, sp, dp, pl, ext):
    pkt = IPv6(src=src, dst=dst, hlim=9)
    if ext & 1:
        pkt = pkt / IPv6ExtHdrHopByHop()
    if ext & 2:
        pkt = pkt / IPv6ExtHdrDestOpt()
    raw = bytes(Ether(src=MAC_A, dst=MAC_B) / pkt / UDP(sport=sp, dport=dp) / pl)
    e = wire.parse_ethernet_untrusted(memoryview(raw))
    r = wire.parse_ipv6_untrusted(e[3])
    s, d, nh, hlim, frag, data = r
    assert (nh, hlim, frag) == (17, 9, None)
    assert str(ipaddress.IPv6Address(s)) == str(ipaddress.IPv6Address(src))
    u = wire.parse_udp_untrusted(data, wire.pseudo_sum(6, s, d, 17, len(data)), 6)
    assert u[:2] == (sp, dp) and bytes(u[2]) == pl


@SET
@given(ip4, ip4, port, port, payload)
def test_scapy_udp4_with_padding_and_options(src, dst, sp, dp, pl):
    raw = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=src, dst=dst, options=b"\x01\x01\x01\x00")
                / UDP(sport=sp, dport=dp) / pl) + b"\0" * 11  # Ethernet padding
    i = wire.parse_ipv4_untrusted(memoryview(raw)[14:])
    s, d, proto, *_r, data = i
    u = wire.parse_udp_untrusted(data, wire.pseudo_sum(4, s, d, 17, len(data)))
    assert u[:2] == (sp, dp) and bytes(u[2]) == pl


@SET
@given(ip4, ip4, port, port, u32, u32, st.integers(0, 255), st.integers(0, 65535), payload,
       st.binary(max_size=40))
def test_slirpy_tcp4_parsed_by_scapy_and_dpkt(src, dst, sp, dp, sq, ak, flags, win, pl, opts):
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    seg = wire.tcp_segment(4, s, d, sp, dp, sq, ak, flags, win, opts, pl)
    raw = bytes(wire.build_ipv4(_mac(MAC_A), _mac(MAC_B), s, d, 6, seg, ident=5, ttl=64))
    p = Ether(raw)
    assert p[IP].src == src and p[IP].dst == dst and p[IP].id == 5
    t = p[TCP]
    assert (t.sport, t.dport, t.seq, t.ack, int(t.flags), t.window) == (sp, dp, sq, ak, flags,
                                                                          win)
    ck_ip, ck_tcp = p[IP].chksum, t.chksum
    del p[IP].chksum, p[TCP].chksum
    if not opts:  # scapy re-serialises arbitrary option bytes differently; raw check below
        q = Ether(bytes(p))
        assert (q[IP].chksum, q[TCP].chksum) == (ck_ip, ck_tcp)
    seg_raw = raw[34:]
    pseudo = s + d + bytes([0, 6]) + len(seg_raw).to_bytes(2, "big")
    assert ref_checksum(pseudo + seg_raw) == 0
    assert ref_checksum(raw[14:34]) == 0
    e = dpkt.ethernet.Ethernet(raw)
    assert e.data.data.seq == sq and e.data.data.ack == ak and e.data.data.data == pl
    assert e.data.data.flags == flags


@SET
@given(ip6, ip6, port, port, st.binary(max_size=1400))
def test_slirpy_udp6_parsed_by_scapy_and_dpkt(src, dst, sp, dp, pl):
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    raw = bytes(wire.build_ipv6(b"\x33" * 6, b"\x52" * 6, s, d, 17,
                                wire.udp_datagram(6, s, d, sp, dp, pl)))
    p = Ether(raw)
    ck = p[UDP].chksum
    assert ck != 0
    assert p[UDP].load if pl else True
    assert bytes(p[UDP].payload) == pl
    del p[UDP].chksum
    assert Ether(bytes(p))[UDP].chksum == ck
    e = dpkt.ethernet.Ethernet(raw)
    assert e.data.data.sport == sp and e.data.data.data == pl


@SET
@given(st.integers(0, 65535), st.integers(0, 65535), st.binary(max_size=200))
def test_slirpy_icmp_echo_parsed_by_scapy(ident, seq, pl):
    msg = wire.icmp_message(0, 0, (ident << 16) | seq, pl)
    raw = bytes(wire.build_ipv4(b"\1" * 6, b"\2" * 6, b"\x0a\0\2\2", b"\x0a\0\2\x64", 1, msg))
    p = Ether(raw)
    assert (p[ICMP].type, p[ICMP].id, p[ICMP].seq) == (0, ident, seq)
    ck = p[ICMP].chksum
    del p[ICMP].chksum
    assert Ether(bytes(p))[ICMP].chksum == ck


def test_arp_roundtrip_scapy():
    raw = bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=MAC_A) / ARP(op=1, hwsrc=MAC_A,
                                                               psrc="10.0.2.100",
                                                               pdst="10.0.2.2"))
    a = wire.parse_arp_untrusted(memoryview(raw)[14:])
    assert a == (1, _mac(MAC_A), bytes([10, 0, 2, 100]), b"\0" * 6, bytes([10, 0, 2, 2]))
    out = bytes(wire.build_arp(_mac(MAC_A), _mac(MAC_B), 2, _mac(MAC_B), bytes([10, 0, 2, 2]),
                               _mac(MAC_A), bytes([10, 0, 2, 100])))
    p = Ether(out)
    assert p[ARP].op == 2 and p[ARP].psrc == "10.0.2.2" and p[ARP].hwsrc == MAC_B


def test_ipv4_fragmentation_roundtrip_scapy():
    from scapy.layers.inet import defragment
    s, d = bytes([10, 0, 2, 3]), bytes([10, 0, 2, 100])
    pl = os.urandom(4001)
    frames = wire.fragment_ipv4(b"\1" * 6, b"\2" * 6, s, d, 17,
                                wire.udp_datagram(4, s, d, 53, 999, pl), 42, 1500)
    assert len(frames) == 3 and all(len(f) - 14 <= 1500 for f in frames)
    whole = defragment([Ether(bytes(f))[IP] for f in frames])
    assert len(whole) == 1 and bytes(whole[0][UDP].payload) == pl


def test_ipv4_fragments_carry_the_datagrams_tos():
    """RFC 791 3.2 (fragmentation procedure): every fragment copies the original header, its
    type of service included; the default TOS is 0 (routine, RFC 2474 default DSCP)."""
    s, d = bytes([10, 0, 2, 2]), bytes([10, 0, 2, 15])
    frames = wire.fragment_ipv4(b"\1" * 6, b"\2" * 6, s, d, 17, b"u" * 1000, 5, 576, tos=0x10)
    assert len(frames) == 2
    assert [Ether(bytes(f))[IP].tos for f in frames] == [0x10, 0x10]
    frames = wire.fragment_ipv4(b"\1" * 6, b"\2" * 6, s, d, 17, b"u" * 1000, 5, 576)
    assert [Ether(bytes(f))[IP].tos for f in frames] == [0, 0]
    one = wire.fragment_ipv4(b"\1" * 6, b"\2" * 6, s, d, 17, b"u" * 100, 5, 576)
    assert [Ether(bytes(f))[IP].tos for f in one] == [0]


def test_ipv6_fragment_header_parsed():
    s = ipaddress.IPv6Address("fd00::100").packed
    d = ipaddress.IPv6Address("fd00::2").packed
    frames = wire.fragment_ipv6(b"\1" * 6, b"\2" * 6, s, d, 17, b"x" * 3000, 7, 1280)
    assert len(frames) == 3 and all(len(f) - 14 <= 1280 for f in frames)
    offs = []
    for f in frames:
        r = wire.parse_ipv6_untrusted(memoryview(f)[14:])
        assert r[2] == 17 and r[4][0] == 7
        offs.append((r[4][1], r[4][2]))
        assert IPv6ExtHdrFragment in Ether(bytes(f))
    assert offs[0] == (0, True) and offs[-1][1] is False


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 3000), st.integers(68, 1600), st.booleans())
@example(1480, 1500, False)  # IPv4: exactly the MTU, and one byte more
@example(1481, 1500, False)
@example(1481, 1501, False)  # fits an MTU that is no multiple of 8 past the header
@example(1240, 1280, False)  # IPv6: exactly the MTU, one more, a 1-byte last fragment
@example(1241, 1280, False)
@example(1233, 1280, False)
@example(2464, 1280, True)  # two full IPv6 fragments and nothing after
def test_fragments_obey_rfc791_and_rebuild_the_datagram(n, mtu, exact):
    """RFC 791 2.3/3.2 (RFC 8200 4.5 for IPv6): every fragment fits the MTU, all but the last
    carry a multiple of 8 bytes and MF, the last has MF clear (also when the data is an exact
    multiple of the fragment size), offsets follow each other, and the pieces put back
    together are the datagram, whatever the MTU."""
    from slirpy.stack.reassembly import Reassembler
    from slirpy.stack.stats import Stats
    s4, d4 = bytes([10, 0, 2, 2]), bytes([10, 0, 2, 100])
    s6, d6 = b"\xfd" + b"\0" * 14 + b"\2", b"\xfd" + b"\0" * 14 + b"\x64"
    asked = n
    for family in (4, 6):
        m = max(mtu, 1280) if family == 6 else mtu
        step = (m - (20 if family == 4 else 48)) // 8 * 8
        n = max(step, asked // step * step) if exact and asked else asked  # an exact multiple
        l4 = bytes(i & 0xFF for i in range(n))
        if family == 4:
            frames = wire.fragment_ipv4(b"\1" * 6, b"\2" * 6, s4, d4, 17, l4, 0x1234, m, 33)
        else:
            frames = wire.fragment_ipv6(b"\1" * 6, b"\2" * 6, s6, d6, 17, l4, 0x12345678, m, 33)
        r = Reassembler(Stats())
        whole, expect_off = None, 0
        for i, f in enumerate(frames):
            assert len(f) - 14 <= m
            last = i == len(frames) - 1
            if family == 4:
                src, dst, proto, ttl, ident, off, more, data = wire.parse_ipv4_untrusted(
                    memoryview(f)[14:])
                assert (src, dst, proto, ttl, ident) == (s4, d4, 17, 33, 0x1234)
            else:
                src, dst, proto, ttl, frag, data = wire.parse_ipv6_untrusted(memoryview(f)[14:])
                assert (src, dst, proto, ttl) == (s6, d6, 17, 33)
                if len(frames) == 1:
                    assert frag is None and bytes(data) == l4
                    continue
                assert f[14 + 6] == 44 and f[55] == 0 and f[57] & 6 == 0  # reserved: zero
                ident, off, more, _ = frag
                assert ident == 0x12345678
            assert off == expect_off and more is not last
            if not last:
                assert len(data) % 8 == 0 and len(data) > 0
            expect_off += len(data)
            got = r.insert((family, 1), off, more, data, 0.0)
            if len(frames) > 1:
                assert (got is not None) is last
                whole = got if last else whole
            else:
                assert off == 0 and not more and bytes(data) == l4
        assert (len(frames) == 1) is ((20 if family == 4 else 40) + n <= m)  # fits: whole
        if len(frames) > 1:
            assert whole == l4
            assert all(len(f) - 14 > m - 8 for f in frames[:-1])  # full-size but for the last
        else:
            assert (20 if family == 4 else 40) + n <= m


def test_arp_reply_is_a_minimal_42_byte_frame():
    """RFC 826 over Ethernet: 14-byte header + 28-byte ARP packet (the NIC pads to 60)."""
    out = wire.build_arp(_mac(MAC_A), _mac(MAC_B), 2, _mac(MAC_B), bytes([10, 0, 2, 2]),
                         _mac(MAC_A), bytes([10, 0, 2, 100]))
    assert len(out) == 42 and wire.parse_arp_untrusted(memoryview(out)[14:]) == (
        2, _mac(MAC_B), bytes([10, 0, 2, 2]), _mac(MAC_A), bytes([10, 0, 2, 100]))


@pytest.mark.parametrize("n", [0, 28, 547, 548, 549, 1500, 65535])
def test_icmp_errors_quote_as_much_as_fits(n):
    """RFC 1812 4.3.2.3: an ICMPv4 error is at most 576 bytes (20 IP + 8 ICMP + quote);
    RFC 4443 2.4(c): an ICMPv6 error fits the minimum MTU 1280 (40 IPv6 + 8 + quote); the
    unused word is zero (RFC 792, RFC 4443 3.1) unless given (e.g. the next-hop MTU)."""
    quoted = bytes(i & 0xFF for i in range(n))
    m4 = wire.build_icmp4_error(3, 1, quoted)
    assert len(m4) == 8 + min(n, 576 - 28) and bytes(m4[8:]) == quoted[:548]
    assert m4[:2] == b"\x03\x01" and m4[4:8] == b"\0" * 4 and checksum(m4) == 0
    assert wire.build_icmp4_error(3, 4, quoted, 1500)[4:8] == (1500).to_bytes(4, "big")
    s6, d6 = b"\xfd" + b"\0" * 14 + b"\2", b"\xfd" + b"\0" * 14 + b"\x64"
    m6 = wire.build_icmp6_error(s6, d6, 1, 4, quoted)
    assert len(m6) == 8 + min(n, 1280 - 48) and bytes(m6[8:]) == quoted[:1232]
    assert m6[:2] == b"\x01\x04" and m6[4:8] == b"\0" * 4
    assert wire.parse_icmp_untrusted(memoryview(m6), wire.pseudo_sum(6, s6, d6, 58, len(m6)))[:3] \
        == (1, 4, 0)


def test_frames_toward_the_guest_have_ttl_64():
    """libslirp sends with IPDEFTTL 64 / hop limit 64; so do we, fragmented or not."""
    s4, d4 = bytes([10, 0, 2, 2]), bytes([10, 0, 2, 100])
    s6, d6 = b"\xfd" + b"\0" * 14 + b"\2", b"\xfd" + b"\0" * 14 + b"\x64"
    for n in (10, 3000):
        for f in wire.fragment_ipv4(b"\1" * 6, b"\2" * 6, s4, d4, 17, b"u" * n, 1, 1500):
            assert wire.parse_ipv4_untrusted(memoryview(f)[14:])[3] == 64
        for f in wire.fragment_ipv6(b"\1" * 6, b"\2" * 6, s6, d6, 17, b"u" * n, 1, 1500):
            assert wire.parse_ipv6_untrusted(memoryview(f)[14:])[3] == 64
    assert wire.parse_ipv4_untrusted(memoryview(wire.build_ipv4(
        b"\1" * 6, b"\2" * 6, s4, d4, 17, b"u"))[14:])[3] == 64
    assert wire.parse_ipv6_untrusted(memoryview(wire.build_ipv6(
        b"\1" * 6, b"\2" * 6, s6, d6, 17, b"u"))[14:])[3] == 64


def test_arp_other_than_ethernet_ipv4_is_refused():
    """RFC 826: hardware type 1 (Ethernet) with 6-byte addresses, protocol 0x0800 with 4-byte
    addresses; anything else is not ours to answer."""
    good = wire.build_arp(_mac(MAC_A), _mac(MAC_B), 1, _mac(MAC_B), bytes(4), bytes(6),
                          bytes(4))[14:]
    assert wire.parse_arp_untrusted(memoryview(good))[0] == 1
    for off, val in ((1, 6), (2, 0x86), (4, 8), (5, 16)):  # htype, ptype, hlen, plen
        bad = bytearray(good)
        bad[off] = val
        assert wire.parse_arp_untrusted(memoryview(bad)) == "arp_unsupported", off
    assert wire.parse_arp_untrusted(memoryview(good[:27])) == "arp_truncated"


def test_udp_length_and_zero_checksum():
    """RFC 768: a computed checksum of zero is sent as all ones (zero means "none"); RFC 2675 3:
    a datagram longer than 65535 bytes carries length 0 (only 65535 itself still fits)."""
    from slirpy.stack.checksum import ones_sum
    s6, d6 = b"\xfd" + b"\0" * 14 + b"\2", b"\xfd" + b"\0" * 14 + b"\x64"
    base = wire.udp_datagram(6, s6, d6, 53, 4000, b"\0\0")
    base[6:8] = b"\0\0"
    total = ones_sum(base, wire.pseudo_sum(6, s6, d6, 17, len(base)))
    word = (0xFFFF - total) % 0xFFFF  # makes the sum all ones: checksum 0
    d = wire.udp_datagram(6, s6, d6, 53, 4000, word.to_bytes(2, "big"))
    assert d[6:8] == b"\xff\xff"
    assert wire.parse_udp_untrusted(memoryview(d), wire.pseudo_sum(6, s6, d6, 17, len(d)), 6) \
        == (53, 4000, word.to_bytes(2, "big"))
    assert wire.udp_datagram(6, s6, d6, 1, 2, bytes(65535 - 8))[4:6] == b"\xff\xff"
    assert wire.udp_datagram(6, s6, d6, 1, 2, bytes(65536 - 8))[4:6] == b"\0\0"


def test_ndp_options_walk():
    """RFC 4861 4.6: options are type, length in units of 8 bytes (0 is invalid), value; they
    follow each other to the end. Every option is read; one running past the end, or 64 and
    more of them (bounded work per packet; real messages carry a handful), is a drop."""
    o1, o2, o3 = b"\x01\x01" + b"\xaa" * 6, b"\x05\x01" + b"\0\0" + b"\0\0\x05\xdc", \
        b"\x03\x02" + b"\x11" * 14
    assert wire.parse_ndp_options_untrusted(memoryview(o1 + o2 + o3)) == {
        1: b"\xaa" * 6, 5: o2[2:], 3: b"\x11" * 14}
    assert wire.parse_ndp_options_untrusted(memoryview(o1 + b"\x03\x02" + b"\x11" * 6)) == \
        "ndp_option_truncated"
    assert wire.parse_ndp_options_untrusted(memoryview(o1 + b"\x03")) == "ndp_option_truncated"
    assert wire.parse_ndp_options_untrusted(memoryview(b"")) == {}
    many = b"".join(bytes([100 + i % 50, 1]) + b"\0" * 6 for i in range(63))
    assert len(wire.parse_ndp_options_untrusted(memoryview(many))) == 50
    assert wire.parse_ndp_options_untrusted(memoryview(many + o1)) == "ndp_too_many_options"


def test_icmp_drop_reasons():
    assert wire.parse_icmp_untrusted(memoryview(b"\x08\0\0\0\0\0\0")) == "icmp_truncated"
    m = wire.icmp_message(8, 0, 0x10002, b"ping")
    assert wire.parse_icmp_untrusted(memoryview(m)) == (8, 0, 0x10002, b"ping")
    m[9] ^= 1
    assert wire.parse_icmp_untrusted(memoryview(m)) == "icmp_bad_checksum"


def test_ndp_messages_have_code_0_and_valid_prefix_flags():
    """RFC 4861 4.2/4.4/4.6.2: RA and NA carry code 0; the prefix information option is 4 units
    long with L and A set and every reserved bit zero."""
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_RA, ICMPv6NDOptPrefixInfo
    a6 = lambda s: ipaddress.IPv6Address(s).packed  # noqa: E731
    mac = _mac(MAC_B)
    na = wire.build_ndp_na(a6("fd00::2"), a6("fe80::1"), a6("fd00::2"), mac, wire.NA_SOLICITED)
    ra = wire.build_ndp_ra(a6("fe80::2"), wire.ALL_NODES6, mac, 1500, a6("fd00::"))
    assert na[1] == 0 and ra[1] == 0
    p = ICMPv6ND_RA(bytes(ra))
    pi = p[ICMPv6NDOptPrefixInfo]
    assert (pi.len, pi.L, pi.A, pi.R, pi.res1, pi.res2) == (4, 1, 1, 0, 0, 0)
    assert (pi.validlifetime, pi.preferredlifetime) == (86400, 14400)
    assert ICMPv6ND_NA(bytes(na)).S == 1 and ICMPv6ND_NA(bytes(na)).R == 0


def test_build_ipv4_header_fields():
    """RFC 791: version 4, IHL 5, total length, ID, flags (DF 0x4000, MF 0x2000) and offset in
    8-byte units; TOS 0: no ECN codepoint, we do not do ECN (RFC 3168 5: only ECN-capable
    transports may set ECT); a valid header checksum."""
    s4, d4 = bytes([10, 0, 2, 2]), bytes([10, 0, 2, 100])
    f = wire.build_ipv4(b"\1" * 6, b"\2" * 6, s4, d4, 17, b"abc")
    assert len(f) == 14 + 20 + 3 and f[12:14] == b"\x08\x00"
    assert f[14:24] == bytes.fromhex("45000017000000004011")
    assert checksum(f[14:34]) == 0 and bytes(f[34:]) == b"abc"
    f = wire.build_ipv4(b"\1" * 6, b"\2" * 6, s4, d4, 6, b"", ident=0x12345, ttl=9, df=True)
    assert f[18:24] == bytes.fromhex("23454000" "0906") and checksum(f[14:34]) == 0
    f = wire.build_ipv4(b"\1" * 6, b"\2" * 6, s4, d4, 17, b"x" * 8, frag_off=1480, more=True)
    assert f[20:22] == (0x2000 | 185).to_bytes(2, "big")
    assert wire.parse_ipv4_untrusted(memoryview(f)[14:])[4:7] == (0, 1480, True)


def _ip4(total=None, ihl=5, ff=0, body=b"", opts=b""):
    h = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total if total is not None else
                              ihl * 4 + len(body), 7, ff, 64, 17, 0, bytes([10, 0, 2, 100]),
                              bytes([1, 2, 3, 4]))) + opts
    struct.pack_into("!H", h, 10, checksum(h))
    return bytes(h) + body


def test_ipv4_header_edges():
    """RFC 791 3.1: IHL counts 32-bit words (5 to 15, options in between), total length covers
    header and data and cannot be shorter than the header; the first flag bit is reserved and
    must be zero; bytes after total length (Ethernet padding) are not data (RFC 1122 3.3.2)."""
    p = wire.parse_ipv4_untrusted
    assert p(memoryview(_ip4()))[7] == b""  # a bare 20-byte header is a whole datagram
    assert bytes(p(memoryview(_ip4(body=b"data") + b"\0" * 6))[7]) == b"data"
    opt = _ip4(ihl=6, opts=b"\x01\x01\x01\x00", body=b"after options")
    assert bytes(p(memoryview(opt))[7]) == b"after options"
    assert p(memoryview(_ip4(ihl=6, opts=b"\x01\x01"))) == "ipv4_truncated"  # IHL past the end
    assert p(memoryview(_ip4()[:19])) == "ipv4_truncated"
    assert p(memoryview(_ip4(total=19))) == "ipv4_bad_length"
    assert p(memoryview(_ip4(total=21))) == "ipv4_length_exceeds_frame"
    assert p(memoryview(_ip4(ff=0x8000))) == "ipv4_reserved_flag"
    assert p(memoryview(_ip4(ff=0x4000)))[5:7] == (0, False)  # DF alone: a whole datagram


def test_ethernet_header_edges():
    frame = b"\1" * 6 + b"\2" * 6 + b"\x08\x00"
    assert wire.parse_ethernet_untrusted(memoryview(frame)) == (b"\1" * 6, b"\2" * 6, 0x0800, b"")
    assert wire.parse_ethernet_untrusted(memoryview(frame[:13])) == "eth_truncated"


def test_udp_zero_checksum_is_none_over_ipv4_only():
    """RFC 768: a zero checksum means "not computed" (IPv4, the default family here); RFC 8200
    8.1: over IPv6 it is mandatory and a zero one is dropped."""
    d = bytearray(wire.udp_datagram(4, bytes(4), bytes(4), 1, 2, b"hi"))
    d[6:8] = b"\0\0"
    ps = wire.pseudo_sum(4, bytes(4), bytes(4), 17, len(d))
    assert wire.parse_udp_untrusted(memoryview(d), ps) == (1, 2, b"hi")
    assert wire.parse_udp_untrusted(memoryview(d), ps, 6) == "udp6_zero_checksum"
    assert wire.parse_udp_untrusted(memoryview(d[:7]), ps) == "udp_truncated"
    for bad_len in (7, 11):  # shorter than its own header, longer than what arrived
        b = bytearray(d)
        b[4:6] = bad_len.to_bytes(2, "big")
        assert wire.parse_udp_untrusted(memoryview(b), None) == "udp_bad_length"
    d[6:8] = b"\0\1"
    assert wire.parse_udp_untrusted(memoryview(d), ps) == "udp_bad_checksum"
    assert wire.parse_udp_untrusted(memoryview(d), None) == (1, 2, b"hi")  # offloaded: trusted


def _ext(nh, size, kind_len):
    """An extension header of ``size`` bytes whose length byte is ``kind_len``."""
    return bytes([nh, kind_len]) + b"\0" * (size - 2)


def _ip6(nh, payload, pad=b""):
    return bytes([0x60, 0, 0, 0]) + len(payload).to_bytes(2, "big") + bytes([nh, 64]) \
        + b"\xfd" + b"\0" * 14 + b"\x64" + b"\xfd" + b"\0" * 14 + b"\2" + payload + pad


def test_ipv6_extension_header_chain():
    """RFC 8200 4: hop-by-hop (0), routing (43), destination options (60) count their length in
    8-byte units after the first 8; AH (51) in 4-byte units minus 2 (RFC 4302 2.2); the
    chain is walked to the upper layer, at most 8 headers deep; payload stops at the payload
    length (Ethernet padding is not data)."""
    p = wire.parse_ipv6_untrusted
    assert p(memoryview(_ip6(59, b"")))[2:] == (59, 64, None, b"")  # the bare 40-byte header
    assert p(memoryview(_ip6(17, b"udp!", pad=b"\0" * 6)))[5] == b"udp!"
    # hop-by-hop (8) -> routing (16) -> destination options (8) -> AH (24) -> UDP
    chain = _ext(43, 8, 0) + _ext(60, 16, 1) + _ext(51, 8, 0) + _ext(17, 24, 4)
    r = p(memoryview(_ip6(0, chain + b"data")))
    assert r[2] == 17 and r[4] is None and bytes(r[5]) == b"data"
    r = p(memoryview(_ip6(51, _ext(17, 12, 1) + b"d")))  # AH: (1 + 2) * 4 = 12 bytes
    assert r[2] == 17 and bytes(r[5]) == b"d"
    r = p(memoryview(_ip6(60, _ext(59, 8, 0))))  # a header that ends exactly at the end
    assert r[2] == 59 and bytes(r[5]) == b""
    eight = b"".join(_ext(60, 8, 0) for _ in range(7)) + _ext(17, 8, 0)
    assert p(memoryview(_ip6(60, eight + b"x")))[2] == 17
    nine = _ext(60, 8, 0) + eight
    assert p(memoryview(_ip6(60, nine + b"x"))) == "ipv6_too_many_ext_headers"
    # a fragment header exactly filling the packet, and one a byte short
    frag = bytes([17, 0, 0, 0]) + (7).to_bytes(4, "big")
    assert p(memoryview(_ip6(44, frag)))[4:] == ((7, 0, False, 40), b"")
    assert p(memoryview(_ip6(44, frag[:7]))) == "ipv6_truncated_ext"
    assert p(memoryview(_ip6(0, b"\x11"))) == "ipv6_truncated_ext"  # no room for its length
    assert p(memoryview(_ip6(0, _ext(17, 16, 1)[:15]))) == "ipv6_truncated_ext"
    assert p(memoryview(_ip6(51, _ext(17, 12, 1)[:11]))) == "ipv6_truncated_ext"
    assert p(memoryview(_ip6(59, b"")[:39])) == "ipv6_truncated"
    bad = bytearray(_ip6(59, b""))
    bad[0] = 0x40
    assert p(memoryview(bad)) == "ipv6_bad_version"
    assert p(memoryview(_ip6(59, b"abc")[:42])) == "ipv6_length_exceeds_frame"


# ---------------------------------------------------------------------------- hostile input
GOOD_TCP = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="10.0.2.100", dst="1.2.3.4") / TCP(options=[("MSS", 1)]) / b"hi")


@pytest.mark.parametrize("mutate,reason", [
    (lambda b: b[:14 + 19], "ipv4_truncated"),
    (lambda b: b[:14] + bytes([0x44]) + b[15:], "ipv4_bad_ihl"),
    (lambda b: b[:14] + bytes([0x65]) + b[15:], "ipv4_bad_version"),
    (lambda b: b[:16] + b"\xff\xff" + b[18:], "ipv4_length_exceeds_frame"),
    (lambda b: b[:24] + bytes([b[24] ^ 1]) + b[25:], "ipv4_bad_checksum"),
])
def test_ipv4_drop_reasons(mutate, reason):
    assert wire.parse_ipv4_untrusted(memoryview(mutate(GOOD_TCP))[14:]) == reason


def test_tcp_drop_reasons():
    seg = GOOD_TCP[34:]
    ps = wire.pseudo_sum(4, bytes([10, 0, 2, 100]), bytes([1, 2, 3, 4]), 6, len(seg))
    assert not isinstance(wire.parse_tcp_untrusted(memoryview(seg), ps), str)
    assert wire.parse_tcp_untrusted(memoryview(seg[:12] + b"\x40" + seg[13:]), ps) == \
        "tcp_bad_data_offset"
    assert wire.parse_tcp_untrusted(memoryview(seg[:12] + b"\xf0" + seg[13:]), ps) == \
        "tcp_data_offset_exceeds_segment"
    assert wire.parse_tcp_untrusted(memoryview(seg[:-1] + b"X"), ps) == "tcp_bad_checksum"
    assert wire.parse_tcp_untrusted(memoryview(seg[:19]), ps) == "tcp_truncated"


def test_ipv6_ext_header_loop_bounded():
    # 20 hop-by-hop-style headers chained: must be rejected, not walked forever
    ext = (b"\x3c\x00" + b"\x01\x04\x00\x00\x00\x00") * 20
    ip6 = IPv6(src="fd00::100", dst="fd00::2", nh=60, plen=len(ext))
    raw = bytes(ip6)[:40] + ext
    assert wire.parse_ipv6_untrusted(memoryview(raw)) == "ipv6_too_many_ext_headers"
    assert wire.parse_ipv6_untrusted(memoryview(raw[:60])) in ("ipv6_length_exceeds_frame",)


def test_ndp_zero_length_option_dropped():
    assert wire.parse_ndp_options_untrusted(memoryview(b"\x01\x00" + b"\0" * 6)) == \
        "ndp_option_zero_length"
    assert wire.parse_ndp_options_untrusted(memoryview(b"\x01\x01" + b"\xaa" * 6)) == \
        {1: b"\xaa" * 6}


# Every parser of guest bytes, called the way the stack calls it. A new *_untrusted function
# in wire.py or tcp_options.py must be added here (test_every_untrusted_parser_is_fuzzed).
UNTRUSTED = {
    "parse_vnet_untrusted": lambda mv, ps, c, h: [wire.parse_vnet_untrusted(mv)],
    "parse_ethernet_untrusted": lambda mv, ps, c, h: [wire.parse_ethernet_untrusted(mv)],
    "parse_arp_untrusted": lambda mv, ps, c, h: [wire.parse_arp_untrusted(mv)],
    "parse_ipv4_untrusted": lambda mv, ps, c, h: [wire.parse_ipv4_untrusted(mv)],
    "parse_ipv6_untrusted": lambda mv, ps, c, h: [wire.parse_ipv6_untrusted(mv)],
    "parse_udp_untrusted": lambda mv, ps, c, h: [wire.parse_udp_untrusted(mv, p, fam)
                                                 for p in (None, ps) for fam in (4, 6)],
    "parse_tcp_untrusted": lambda mv, ps, c, h: [wire.parse_tcp_untrusted(mv, p)
                                                 for p in (None, ps)],
    "parse_icmp_untrusted": lambda mv, ps, c, h: [wire.parse_icmp_untrusted(mv),
                                                  wire.parse_icmp_untrusted(mv, ps)],
    "parse_ndp_options_untrusted": lambda mv, ps, c, h: [wire.parse_ndp_options_untrusted(mv)],
    "_parse_ndp_target_untrusted": lambda mv, ps, c, h: [
        wire._parse_ndp_target_untrusted(wire._NS_REASONS, c, h, mv)],
    "parse_ndp_ns_untrusted": lambda mv, ps, c, h: [wire.parse_ndp_ns_untrusted(c, h, mv),
                                                    wire.parse_ndp_ns_untrusted(0, 255, mv)],
    "parse_ndp_rs_untrusted": lambda mv, ps, c, h: [wire.parse_ndp_rs_untrusted(c, h, mv),
                                                    wire.parse_ndp_rs_untrusted(0, 255, mv)],
    "parse_ndp_na_untrusted": lambda mv, ps, c, h: [wire.parse_ndp_na_untrusted(c, h, mv),
                                                    wire.parse_ndp_na_untrusted(0, 255, mv)],
    "parse_tcp_options_untrusted": lambda mv, ps, c, h: [parse_tcp_options_untrusted(mv)],
}


def test_every_untrusted_parser_is_fuzzed():
    from slirpy.stack import tcp_options
    names = {n for m in (wire, tcp_options) for n in vars(m) if n.endswith("_untrusted")}
    assert names == set(UNTRUSTED)


def _inside(part, whole: bytes) -> bool:
    """A returned view/bytes must be a piece of the input, never bytes from elsewhere."""
    return bytes(part) in whole


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 0x3FFFF), st.integers(0, 255),
       st.sampled_from([0, 1, 64, 254, 255]))
def test_parsers_parse_or_refuse_never_raise(b, pseudo, code, hlim):
    """Guest bytes give a result or a drop reason (a non-empty snake_case str), never an
    exception; whatever payload comes back is a slice of the input (RFC 1122 1.2.2: be liberal,
    but never read past what arrived)."""
    mv = memoryview(b)
    for name, call in UNTRUSTED.items():
        for r in call(mv, pseudo, code, hlim):
            if isinstance(r, str):
                assert r and r == r.lower() and " " not in r, (name, r)
                continue
            assert isinstance(r, (tuple, dict)), (name, r)
            if name in ("parse_ethernet_untrusted", "parse_vnet_untrusted",
                        "parse_ipv4_untrusted", "parse_ipv6_untrusted", "parse_udp_untrusted",
                        "parse_tcp_untrusted", "parse_icmp_untrusted"):
                assert _inside(r[-1], b) and len(r[-1]) < max(len(b), 1), (name, r)


def test_ndp_codecs_against_scapy():
    from scapy.layers.inet6 import (ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6ND_RA,
                                    ICMPv6NDOptMTU, ICMPv6NDOptPrefixInfo,
                                    ICMPv6NDOptSrcLLAddr)
    a6 = lambda s: ipaddress.IPv6Address(s).packed  # noqa: E731
    mac = _mac(MAC_B)
    na = wire.build_ndp_na(a6("fd00::2"), a6("fe80::1"), a6("fd00::2"), mac,
                           wire.NA_ROUTER | wire.NA_SOLICITED | wire.NA_OVERRIDE)
    p = Ether(bytes(wire.build_ipv6(_mac(MAC_A), mac, a6("fd00::2"), a6("fe80::1"), 58, na,
                                    255)))
    n = p[ICMPv6ND_NA]
    assert (n.R, n.S, n.O, n.tgt) == (1, 1, 1, "fd00::2")
    ck = n.cksum
    del n.cksum
    assert Ether(bytes(p))[ICMPv6ND_NA].cksum == ck
    ra = wire.build_ndp_ra(a6("fe80::2"), wire.ALL_NODES6, mac, 1500, a6("fd00::"))
    p = Ether(bytes(wire.build_ipv6(wire.ALL_NODES_MAC, mac, a6("fe80::2"), wire.ALL_NODES6,
                                    58, ra, 255)))
    assert p[ICMPv6ND_RA].routerlifetime == 1800 and p[ICMPv6ND_RA].chlim == 64
    assert p[ICMPv6NDOptMTU].mtu == 1500 and p[ICMPv6NDOptSrcLLAddr].lladdr == MAC_B
    pi = p[ICMPv6NDOptPrefixInfo]
    assert (pi.prefix, pi.prefixlen, pi.L, pi.A) == ("fd00::", 64, 1, 1)
    ns = bytes(ICMPv6ND_NS(tgt="fd00::3") / ICMPv6NDOptSrcLLAddr(lladdr=MAC_A))
    assert wire.parse_ndp_ns_untrusted(0, 255, memoryview(ns)[8:]) == (a6("fd00::3"),
                                                                        {1: _mac(MAC_A)})
    assert wire.parse_ndp_ns_untrusted(0, 64, memoryview(ns)[8:]) == "ndp_ns_not_link_local"
    err = wire.build_icmp6_error(a6("fd00::2"), a6("fd00::100"), 1, 4, b"\x60" + b"\0" * 2000)
    assert len(err) == 1280 - 40 and err[0] == 1 and err[1] == 4
