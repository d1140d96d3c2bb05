"""The Stack against protocol rules, both address families, every outbound call (checked with
scapy): ICMP echo and errors over IPv6 too, TCP over IPv6 without vnet, NDP answers where RFC
4861 says they go, the destinations a guest may reach, and the bounded queues."""

from __future__ import annotations

import ipaddress

from scapy.layers.inet import ICMP, IP, TCP, UDP, ICMPerror, IPerror, UDPerror
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest,
                                ICMPv6MLReport, ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6ND_RA,
                                ICMPv6ND_RS, ICMPv6NDOptDstLLAddr, ICMPv6NDOptSrcLLAddr,
                                ICMPv6TimeExceeded, IPerror6, IPv6)
from scapy.layers.l2 import ARP, Ether

from slirpy.config import Config
from slirpy.stack import events, wire
from slirpy.stack.stack import MAX_EVENTS, MAX_OUT_FRAMES, Stack

GUEST_MAC = "02:11:22:33:44:55"
OTHER_MAC = "02:aa:bb:cc:dd:ee"
ROUTER_MAC = "52:55:0a:00:02:02"
GUEST_LL = "fe80::11:22ff:fe33:4455"


def eth(pkt, src=GUEST_MAC):
    return bytes(Ether(src=src, dst=ROUTER_MAC) / pkt)


def _mac(m):
    return bytes.fromhex(m.replace(":", ""))


def frames(s):
    return [Ether(bytes(f)) for f in s.frames_to_send(s._last_now)]


def drain(s):
    out = []
    while (ev := s.next_event()) is not None:
        out.append(ev)
    return out


def learned(s, v6=False):
    """The guest's MAC known, as after any frame of its own."""
    if v6:
        s.receive_frame(eth(IPv6(src="fd00::100", dst="fd00::3") / UDP(sport=1, dport=9)), 0.0)
    else:
        s.receive_frame(eth(ARP(op=2, hwsrc=GUEST_MAC, psrc="10.0.2.100", pdst="10.0.2.2")), 0.0)
    s.frames_to_send(s._last_now)
    drain(s)
    return s


def checksum_ok(p, layer):
    ck = p[layer].chksum if hasattr(p[layer], "chksum") else p[layer].cksum
    q = Ether(bytes(p))
    if hasattr(q[layer], "chksum"):
        del q[layer].chksum
        return Ether(bytes(q))[layer].chksum == ck
    del q[layer].cksum
    return Ether(bytes(q))[layer].cksum == ck


# ---------------------------------------------------------------------------------- ICMP echo
def test_echo_replies_both_families():
    """RFC 792 / RFC 4443 4.2: an echo reply is type 0 / 129, code 0, with the request's
    identifier, sequence number and data; 16-bit fields are taken modulo 2**16."""
    s = learned(Stack(Config(enable_ipv6=True)), v6=True)
    s.receive_frame(eth(IPv6(src="fd00::100", dst="2001:db8::1") / ICMPv6EchoRequest(
        id=0x4242, seq=7, data=b"ping6")), 0.0)
    assert drain(s) == [events.IcmpEchoRequest(6, "fd00::100", "2001:db8::1", 0x4242, 7,
                                               b"ping6")]
    assert s.frames_to_send(s._last_now) == []
    s.send_icmp_echo_reply(6, "2001:db8::1", "fd00::100", 0x4242, 7, b"ping6", 0.1)
    s.send_icmp_echo_reply(4, "198.51.100.7", "10.0.2.100", 0x10009, 0x10007, b"ping4", 0.1)
    p6, p4 = frames(s)
    assert (p6.dst, p6[IPv6].src, p6[IPv6].dst, p6[IPv6].nh) == (GUEST_MAC, "2001:db8::1",
                                                                 "fd00::100", 58)
    r = p6[ICMPv6EchoReply]
    assert (r.type, r.code, r.id, r.seq, r.data) == (129, 0, 0x4242, 7, b"ping6")
    assert checksum_ok(p6, ICMPv6EchoReply)
    assert (p4[IP].src, p4[IP].dst) == ("198.51.100.7", "10.0.2.100")
    assert (p4[ICMP].type, p4[ICMP].code, p4[ICMP].id, p4[ICMP].seq) == (0, 0, 9, 7)
    assert bytes(p4[ICMP].payload) == b"ping4"
    # echo to our own addresses is answered by the stack, code 0 too
    s.receive_frame(eth(IPv6(src="fd00::100", dst="fd00::3") / ICMPv6EchoRequest(
        id=1, seq=2, data=b"x")), 0.0)
    s.receive_frame(eth(IP(src="10.0.2.100", dst="10.0.2.3") / ICMP(id=1, seq=2) / b"x"), 0.0)
    p6, p4 = frames(s)
    assert (p6[ICMPv6EchoReply].code, p6[IPv6].src) == (0, "fd00::3")
    assert (p4[ICMP].type, p4[ICMP].code, p4[IP].src) == (0, 0, "10.0.2.3")
    assert drain(s) == []


def test_icmp4_types_other_than_echo_are_counted():
    s = learned(Stack(Config()))
    s.receive_frame(eth(IP(src="10.0.2.100", dst="10.0.2.2") / ICMP(type=13)), 0.0)  # timestamp
    s.receive_frame(eth(IP(src="10.0.2.100", dst="10.0.2.2") / ICMP(type=8, code=1)), 0.0)
    s.receive_frame(eth(IP(src="10.0.2.100", dst="198.51.100.7") / ICMP(chksum=1)), 0.0)
    assert s.frames_to_send(s._last_now) == [] and drain(s) == []
    d = s.stats.dropped
    assert (d["icmp_unhandled_type"], d["icmp_bad_code"], d["icmp_bad_checksum"]) == (1, 1, 1)


def test_icmp6_types_we_do_not_answer_are_counted():
    """MLD reports and queries (130-132, 143: RFC 2710 / 3810) have nothing to do on this
    link; anything else unknown (here a redirect, 137) is counted apart."""
    s = Stack(Config(enable_ipv6=True))
    for typ in (130, 131, 132, 143, 137):
        s.receive_frame(eth(IPv6(src=GUEST_LL, dst="ff02::16", hlim=1)
                            / ICMPv6MLReport(type=typ)), 0.0)
    assert s.frames_to_send(s._last_now) == [] and drain(s) == []
    assert s.stats.dropped["icmp6_mld"] == 4 and s.stats.dropped["icmp6_unhandled_type"] == 1
    s.receive_frame(eth(IPv6(src="fd00::100", dst="2001:db8::1")
                        / ICMPv6EchoRequest(cksum=1)), 0.0)
    assert drain(s) == [] and s.stats.dropped["icmp_bad_checksum"] == 1


# ------------------------------------------------------------------------------- ICMP errors
def test_udp_unreachable_over_ipv6_quotes_the_datagram():
    """RFC 4443 3.1: destination unreachable (type 1) from the router's link-local address
    fe80::2 (libslirp's source for ICMPv6 errors), the unused word zero, quoting the guest's
    datagram as it sent it (its addresses, ports, payload)."""
    s = learned(Stack(Config(enable_ipv6=True)), v6=True)
    s.send_udp_unreachable(6, "fd00::100", 4000, "2001:db8::1", 9, b"hello", 4, 0.0)
    (p,) = frames(s)
    assert (p[IPv6].src, p[IPv6].dst, p[IPv6].nh) == ("fe80::2", "fd00::100", 58)
    u = p[ICMPv6DestUnreach]
    assert (u.type, u.code, u.unused) == (1, 4, 0) and checksum_ok(p, ICMPv6DestUnreach)
    q = p[IPerror6]
    assert (q.src, q.dst, q.nh) == ("fd00::100", "2001:db8::1", 17)
    assert (p[UDPerror].sport, p[UDPerror].dport) == (4000, 9)
    assert bytes(p[UDPerror].payload) == b"hello"
    # the quoted UDP checksum is the one the guest's datagram had (a valid one)
    d = wire.udp_datagram(6, ipaddress.IPv6Address("fd00::100").packed,
                          ipaddress.IPv6Address("2001:db8::1").packed, 4000, 9, b"hello")
    assert p[UDPerror].chksum == int.from_bytes(d[6:8], "big")
    s.send_udp_unreachable(4, "10.0.2.100", 4000, "198.51.100.7", 9, b"hello", 3, 0.0)
    (p,) = frames(s)
    assert p[IP].src == "10.0.2.2" and (p[ICMP].type, p[ICMP].code) == (3, 3)
    assert p[IPerror].proto == 17 and p[UDPerror].len == 13


def test_echo_errors_quote_an_echo_request():
    """RFC 792 / RFC 4443 2.4: the error quotes the invoking packet, which was an echo request
    (type 8 / 128, code 0) from the guest, with its identifier and sequence number."""
    s = learned(Stack(Config(enable_ipv6=True)), v6=True)
    s.send_icmp_echo_error(6, "2001:db8::ff", "fd00::100", "2001:db8::1", 0x10042, 0x10005,
                           b"probe", 3, 0, 0.0)
    s.send_icmp_echo_error(4, "192.0.2.9", "10.0.2.100", "198.51.100.1", 0x77, 9, b"p4", 11, 0,
                           0.0)
    p6, p4 = frames(s)
    t = p6[ICMPv6TimeExceeded]
    assert (p6[IPv6].src, t.type, t.code) == ("2001:db8::ff", 3, 0)
    assert checksum_ok(p6, ICMPv6TimeExceeded)
    q = p6[IPerror6]
    assert (q.src, q.dst, q.nh) == ("fd00::100", "2001:db8::1", 58)
    req = ICMPv6EchoRequest(bytes(q.payload))
    assert (req.type, req.code, req.id, req.seq, req.data) == (128, 0, 0x42, 5, b"probe")
    assert (p4[ICMP].type, p4[ICMP].code) == (11, 0)
    assert (p4[ICMPerror].type, p4[ICMPerror].code, p4[ICMPerror].id) == (8, 0, 0x77)


# ------------------------------------------------------------------------------------- TCP
def test_tcp_over_both_families_without_vnet():
    """A guest SYN to the outside is a connect request; once accepted the SYN-ACK is a plain
    Ethernet frame of the SYN's family, addresses and ports swapped, checksums valid."""
    for family, ip in ((6, IPv6(src="fd00::100", dst="2001:db8::1")),
                       (4, IP(src="10.0.2.100", dst="198.51.100.7"))):
        s = learned(Stack(Config(enable_ipv6=True)), v6=family == 6)
        s.receive_frame(eth(ip / TCP(sport=40000, dport=80, seq=2**32 - 1, flags="S",
                                     window=1234)), 0.0)
        (ev,) = drain(s)
        assert isinstance(ev, events.TcpConnectRequest) and ev.dport == 80
        s.accept_tcp(ev.flow, 0.0)
        (p,) = frames(s)
        L3 = IPv6 if family == 6 else IP
        assert p.dst == GUEST_MAC and p.type == (0x86DD if family == 6 else 0x0800)
        assert (p[L3].src, p[L3].dst) == (ip.dst, ip.src)
        t = p[TCP]
        assert (t.sport, t.dport, t.flags, t.ack) == (80, 40000, "SA", 0)  # ack wraps to 0
        assert checksum_ok(p, TCP)
        assert [(f["family"], f["src"], f["dport"]) for f in s.flows()] == [(family, ip.src, 80)]
        if family == 6:
            assert p[IPv6].hlim == 64
        # the guest's first data: delayed ACK (at most DELACK after its arrival, by the time
        # the frame brought), then the glue reads it
        s.receive_frame(eth(ip / TCP(sport=40000, dport=80, seq=0, ack=t.seq + 1, flags="PA")
                            / b"hi"), 3.0)
        assert [type(e).__name__ for e in drain(s)] == ["TcpReadable"]
        assert s.frames_to_send(s._last_now) == []
        due = s.tcp.get_timer()
        assert due is not None and 3.0 < due <= 3.0 + 0.01 and s.get_timer() <= due
        s.handle_timer(due)
        (a,) = [f for f in frames(s) if TCP in f]
        assert a[TCP].flags == "A" and a[TCP].ack == 2
        assert s.recv_tcp(ev.flow, 10, due) == b"hi"


def test_tcp_segment_fields_reach_the_engine():
    """The guest's window and the time of arrival are what the engine sees: with a zero window
    the engine sends nothing but probes, later, when its timer says."""
    s = learned(Stack(Config()))
    s.receive_frame(eth(IP(src="10.0.2.100", dst="198.51.100.7")
                        / TCP(sport=40000, dport=80, seq=100, flags="S")), 5.0)
    (ev,) = drain(s)
    s.accept_tcp(ev.flow, 5.0)
    (sa,) = frames(s)
    s.receive_frame(eth(IP(src="10.0.2.100", dst="198.51.100.7")
                        / TCP(sport=40000, dport=80, seq=101, ack=sa[TCP].seq + 1, flags="A",
                              window=0)), 6.0)
    drain(s)
    assert s.send_tcp(ev.flow, b"data", 6.0) == 4
    assert frames(s) == []  # the window is closed
    t = s.get_timer()
    assert t is not None and t > 6.0
    s.handle_timer(t)
    (probe,) = frames(s)
    assert probe[TCP].seq == sa[TCP].seq + 1


def test_vnet_ipv6_gso_uses_the_ipv6_mss():
    """A GSO frame toward the guest is cut by the kernel at the MSS of its family: 40 bytes of
    IPv6 header leave 20 fewer than IPv4 (RFC 8200 / 9293 3.7.1)."""
    import hashlib

    from slirpy import helper
    cfg = Config(enable_ipv6=True)
    s = Stack(cfg, 0.0, offload=helper.TUN_F_CSUM | helper.TUN_F_TSO4 | helper.TUN_F_TSO6)
    syn = Ether(src=GUEST_MAC, dst=ROUTER_MAC) / IPv6(src="fd00::100", dst="2001:db8::1") / TCP(
        sport=40000, dport=80, seq=1, flags="S", options=[("MSS", 65000), ("WScale", 7)])
    s.receive_frame(wire.VNET_NONE + bytes(syn), 0.0)
    (ev,) = drain(s)
    s.accept_tcp(ev.flow, 0.0)
    synack = Ether(bytes(s.frames_to_send(s._last_now)[0][10:]))
    ack = syn.copy()
    ack[TCP].flags, ack[TCP].seq, ack[TCP].ack, ack[TCP].options = "A", 2, synack[TCP].seq + 1, []
    ack[TCP].window = 8192
    s.receive_frame(wire.VNET_NONE + bytes(ack), 0.0)
    s.send_tcp(ev.flow, hashlib.shake_256(b"v6").digest(100_000), 0.0)
    big = [f for f in s.frames_to_send(s._last_now) if wire.VNET.unpack_from(f, 0)[1] != 0]
    assert big and all(wire.VNET.unpack_from(f, 0)[1:4:2] == (wire.VNET_GSO_TCPV6, cfg.mss6)
                       for f in big)


def test_out_queue_is_bounded_for_gso_frames_too():
    """Every frame toward the guest, GSO TCP included, goes through one bounded queue: a guest
    that never lets us write cannot make it grow without bound (oldest dropped, counted)."""
    from slirpy import helper
    s = Stack(Config(), 0.0, offload=helper.TUN_F_CSUM | helper.TUN_F_TSO4)
    s.receive_frame(wire.VNET_NONE + eth(ARP(op=2, hwsrc=GUEST_MAC, psrc="10.0.2.100",
                                             pdst="10.0.2.2")), 0.0)
    s.frames_to_send(s._last_now)
    base = IP(src="10.0.2.100", dst="198.51.100.7")
    s.receive_frame(wire.VNET_NONE + eth(base / TCP(sport=40000, dport=80, seq=1, flags="S")),
                    0.0)
    (ev,) = drain(s)
    s.accept_tcp(ev.flow, 0.0)
    s.tcp.flush_pending(0.0)
    synack = Ether(bytes(s._out[-1][10:]))
    isn = synack[TCP].seq
    s.receive_frame(wire.VNET_NONE + eth(base / TCP(sport=40000, dport=80, seq=2, ack=isn + 1,
                                                    flags="A")), 0.0)
    n = MAX_OUT_FRAMES + 50
    g, r = ipaddress.IPv4Address("10.0.2.100").packed, ipaddress.IPv4Address("198.51.100.7").packed
    for i in range(n):  # out-of-order data: each is answered with a duplicate ACK at once
        seg = wire.tcp_segment(4, g, r, 40000, 80, 1000 + i, isn + 1, 0x10, 65535, b"", b"o")
        s.receive_frame(wire.VNET_NONE + wire.build_ipv4(_mac(ROUTER_MAC), _mac(GUEST_MAC), g,
                                                         r, 6, seg), 0.0)
    out = s.frames_to_send(s._last_now)
    assert len(out) == MAX_OUT_FRAMES
    assert s.stats.dropped["out_queue_full"] >= n - MAX_OUT_FRAMES


def test_event_queue_is_bounded():
    s = learned(Stack(Config()))
    g, r = ipaddress.IPv4Address("10.0.2.100").packed, ipaddress.IPv4Address("198.51.100.7").packed
    for i in range(MAX_EVENTS + 10):
        s.receive_frame(wire.build_ipv4(_mac(ROUTER_MAC), _mac(GUEST_MAC), g, r, 17,
                                        wire.udp_datagram(4, g, r, 1, 2, b"%d" % i)), 0.0)
    evs = drain(s)
    assert len(evs) == MAX_EVENTS and s.stats.dropped["event_queue_full"] == 10
    assert evs[0].payload == b"10" and evs[-1].payload == b"%d" % (MAX_EVENTS + 9)


def test_udp_checksums_checked_at_the_stack():
    """RFC 768 / RFC 8200 8.1: a wrong UDP checksum is dropped; a zero one means "none" over
    IPv4 but is a drop over IPv6."""
    s = learned(Stack(Config(enable_ipv6=True)))
    s.receive_frame(eth(IP(src="10.0.2.100", dst="198.51.100.7") / UDP(chksum=1) / b"x"), 0.0)
    s.receive_frame(eth(IP(src="10.0.2.100", dst="198.51.100.7") / UDP(chksum=0) / b"y"), 0.0)
    s.receive_frame(eth(IPv6(src="fd00::100", dst="2001:db8::1") / UDP(chksum=0) / b"z"), 0.0)
    assert [e.payload for e in drain(s)] == [b"y"]
    d = s.stats.dropped
    assert d["udp_bad_checksum"] == 1 and d["udp6_zero_checksum"] == 1


# ------------------------------------------------------------------------ resolving the guest
def test_solicitation_repeats_once_a_second_while_frames_wait():
    """Frames for a guest whose MAC is unknown wait while the stack asks (ARP who-has, RFC 826,
    target hardware address zero; NS from fe80::2 with our link-layer address, RFC 4861 7.2.2),
    at most once a second, by the time each call brings."""
    s = Stack(Config(enable_ipv6=True))
    sends = [
        lambda t: s.send_udp(4, "198.51.100.7", 1, "10.0.2.100", 2, b"u", t),
        lambda t: s.send_icmp_echo_reply(4, "198.51.100.7", "10.0.2.100", 1, 1, b"e", t),
        lambda t: s.send_udp_unreachable(4, "10.0.2.100", 1, "198.51.100.7", 2, b"x", 3, t),
        lambda t: s.send_icmp_echo_error(4, "192.0.2.1", "10.0.2.100", "198.51.100.7", 1, 1,
                                         b"p", 11, 0, t),
    ]
    t = 10.0
    for send in sends:
        send(t)
        (arp,) = frames(s)
        assert arp.dst == "ff:ff:ff:ff:ff:ff" and arp[ARP].op == 1
        assert (arp[ARP].hwdst, arp[ARP].pdst, arp[ARP].psrc) == ("00:00:00:00:00:00",
                                                                   "10.0.2.100", "10.0.2.2")
        send(t + 0.5)
        assert frames(s) == []
        t += 1.0
    s.send_udp(6, "2001:db8::1", 1, "fd00::100", 2, b"6", t)
    (ns,) = frames(s)
    n = ns[ICMPv6ND_NS]
    assert (n.code, n.res, n.tgt, ns[IPv6].src, ns[IPv6].hlim) == (0, 0, "fd00::100", "fe80::2",
                                                                  255)
    assert ns[ICMPv6NDOptSrcLLAddr].lladdr == ROUTER_MAC
    # a retransmission timer, too, brings the time it fires at
    s2 = Stack(Config())
    fl = s2.connect_tcp(4, "10.0.2.2", 40000, "10.0.2.100", 8080, 0.0)
    assert fl is not None
    assert [p[ARP].op for p in frames(s2)] == [1]
    t = s2.get_timer()
    s2.handle_timer(t)
    assert [p[ARP].op for p in frames(s2)] == [1]
    s2.receive_frame(eth(ARP(op=2, hwsrc=GUEST_MAC, psrc="10.0.2.100", pdst="10.0.2.2")), t)
    assert [p[TCP].flags for p in frames(s2)] == ["S", "S"]  # both SYNs waited


def test_timer_is_the_earliest_of_tcp_reassembly_and_ra():
    s = learned(Stack(Config()))
    fl = s.connect_tcp(4, "10.0.2.2", 40000, "10.0.2.100", 8080, 0.0)
    assert fl is not None
    rto = s.get_timer()
    assert rto is not None and rto > 0.0  # the SYN's retransmission
    s.receive_frame(eth(IP(src="10.0.2.100", dst="198.51.100.7", flags="MF", id=5)
                        / UDP(sport=1, dport=2) / (b"f" * 32)), 0.5)
    assert s.get_timer() == rto  # reassembly times out after 30 s
    s6 = Stack(Config(enable_ipv6=True), now=100.0)
    assert s6.get_timer() == 100.0  # the first router advertisement
    s6.receive_frame(eth(IP(src="10.0.2.100", dst="198.51.100.7", flags="MF", id=5)
                         / UDP(sport=1, dport=2) / (b"f" * 32)), 50.0)
    assert s6.get_timer() == 80.0  # the fragment's timeout comes first


# --------------------------------------------------------------------------------------- NDP
def test_na_goes_to_the_link_layer_address_in_the_solicitation():
    """RFC 4861 7.2.4: a solicited NA is sent to the solicitation's source, at the link-layer
    address its source link-layer option names (the frame's own source otherwise); to a DAD
    probe (source ::) it goes to all-nodes, S clear, hop limit 255."""
    s = Stack(Config(enable_ipv6=True))
    s.receive_frame(eth(IPv6(src=GUEST_LL, dst="ff02::1:ff00:2", hlim=255)
                        / ICMPv6ND_NS(tgt="fd00::2") / ICMPv6NDOptSrcLLAddr(lladdr=OTHER_MAC)),
                    0.0)
    (p,) = frames(s)
    assert p.dst == OTHER_MAC and p[IPv6].dst == GUEST_LL and p[IPv6].hlim == 255
    assert p[ICMPv6ND_NA].S == 1 and p[ICMPv6NDOptDstLLAddr].lladdr == ROUTER_MAC
    s.receive_frame(eth(IPv6(src=GUEST_LL, dst="ff02::1:ff00:2", hlim=255)
                        / ICMPv6ND_NS(tgt="fd00::2")), 0.0)
    (p,) = frames(s)
    assert p.dst == GUEST_MAC
    s.receive_frame(eth(IPv6(src="::", dst="ff02::1:ff00:3", hlim=255)
                        / ICMPv6ND_NS(tgt="fd00::3")), 0.0)
    (p,) = frames(s)
    assert (p.dst, p[IPv6].dst, p[IPv6].hlim, p[ICMPv6ND_NA].S) == ("33:33:00:00:00:01",
                                                                     "ff02::1", 255, 0)


def test_na_uses_the_first_six_bytes_of_an_oversized_link_layer_option():
    """RFC 4861 4.6.1: the option's address is 6 bytes on Ethernet; a longer option (length 2)
    still names the address in its first 6 bytes."""
    s = Stack(Config(enable_ipv6=True))
    opt = bytes([1, 2]) + bytes.fromhex(OTHER_MAC.replace(":", "")) + b"\0" * 8
    s.receive_frame(eth(IPv6(src=GUEST_LL, dst="ff02::1:ff00:2", hlim=255)
                        / ICMPv6ND_NS(tgt="fd00::2") / opt), 0.0)
    (p,) = frames(s)
    assert p.dst == OTHER_MAC


def test_udp_checksum_left_to_the_kernel_is_not_checked():
    """On a vnet tap, NEEDS_CSUM means the guest's kernel never filled the checksum in
    (checksum offload) and DATA_VALID that it checked it: either way it is not ours to verify;
    without a flag a wrong checksum is a drop."""
    from slirpy import helper
    bad = eth(IP(src="10.0.2.100", dst="198.51.100.7") / UDP(sport=1, dport=2, chksum=0x1234)
              / b"offloaded")
    for flags, taken in ((wire.VNET_F_NEEDS_CSUM, True), (wire.VNET_F_DATA_VALID, True),
                         (0, False)):
        s = Stack(Config(), 0.0, offload=helper.TUN_F_CSUM)
        s.receive_frame(wire.VNET.pack(flags, 0, 0, 0, 0, 0) + bad, 0.0)
        assert [e.payload for e in drain(s)] == ([b"offloaded"] if taken else [])
        assert s.stats.dropped["udp_bad_checksum"] == (0 if taken else 1)


def test_rs_answered_at_the_senders_mac():
    s = Stack(Config(enable_ipv6=True))
    s.receive_frame(eth(IPv6(src=GUEST_LL, dst="ff02::2", hlim=255) / ICMPv6ND_RS(),
                        src=OTHER_MAC), 0.0)
    (p,) = frames(s)
    assert p.dst == OTHER_MAC and p[IPv6].dst == GUEST_LL and ICMPv6ND_RA in p
    assert p[ICMPv6ND_RA].code == 0 and p[IPv6].hlim == 255


def test_guest_addresses_outside_our_prefix_are_not_learned_and_oldest_is_forgotten():
    s = Stack(Config(enable_ipv6=True))
    for a in ["2001:db8::5", "fd00::2"] + ["fd00::%x" % (0x100 + i) for i in range(17)]:
        s.receive_frame(eth(IPv6(src=GUEST_LL, dst="fd00::2", hlim=255)
                            / ICMPv6ND_NA(tgt=a, S=0, O=1)), 0.0)
    addrs = s.guest_addrs6()
    assert "2001:db8::5" not in addrs and "fd00::2" not in addrs
    assert addrs == ["fd00::%x" % (0x100 + i) for i in range(1, 17)]
    assert s.stats.dropped["guest6_addr_forgotten"] == 1


def test_ipv6_destinations_outside_the_blocked_ranges_are_reached():
    """Only fe80::/10, ::/80 (::, ::1, v4-mapped/compatible) and our own fd00::/64 are refused:
    neighbours of those ranges go out like any address."""
    s = learned(Stack(Config(enable_ipv6=True)), v6=True)
    ok = ["fd80::1", "fec0::1", "fe00::1", "1::1", "fd00:0:0:1::1"]
    bad = {"fe80::1": "ipv6_dst_link_local", "fe81::1": "ipv6_dst_link_local",
           "febf::1": "ipv6_dst_link_local", "::ffff:1.2.3.4": "ipv6_dst_reserved"}
    for dst in ok + list(bad):
        s.receive_frame(eth(IPv6(src="fd00::100", dst=dst) / UDP(sport=1, dport=2) / b"x"), 0.0)
    assert [e.dst for e in drain(s)] == ok
    assert s.stats.dropped["ipv6_dst_link_local"] == 3
    assert s.stats.dropped["ipv6_dst_reserved"] == 1


# ---------------------------------------------------------------------------- the glue calls
def test_glue_calls_reach_the_tcp_engine():
    """The calls the glue makes on the Stack (refuse, read, half-close, reset, list) act on the
    guest's connection: a refused connect is answered with RST (RFC 9293 3.10.7.3, as
    slirp4netns answers a port nobody listens on), EOF from the host is a FIN, a host reset an
    RST, and flows() lists what is open."""
    s = learned(Stack(Config()))
    ip = IP(src="10.0.2.100", dst="198.51.100.7")
    s.receive_frame(eth(ip / TCP(sport=40001, dport=81, seq=10, flags="S")), 0.0)
    (req,) = drain(s)
    s.reject_tcp(req.flow, "refused", 0.0)
    (rst,) = frames(s)
    assert rst[TCP].flags == "RA" and rst[TCP].ack == 11 and rst[TCP].dport == 40001
    assert [type(e).__name__ for e in drain(s)] == ["TcpClosed"]
    s.receive_frame(eth(ip / TCP(sport=40000, dport=80, seq=100, flags="S")), 0.0)
    (req,) = drain(s)
    s.accept_tcp(req.flow, 0.0)
    (sa,) = frames(s)
    s.receive_frame(eth(ip / TCP(sport=40000, dport=80, seq=101, ack=sa[TCP].seq + 1,
                                 flags="PA") / b"GET"), 0.0)
    assert [type(e).__name__ for e in drain(s)] == ["TcpReadable"]
    assert s.recv_tcp(req.flow, 100, 0.0) == b"GET"
    assert [f["state"] for f in s.flows()] == ["ESTABLISHED"]
    assert (s.flows()[0]["src"], s.flows()[0]["dport"]) == ("10.0.2.100", 80)
    s.shutdown_tcp(req.flow, 0.1)
    assert any(p[TCP].flags.F for p in frames(s))
    s.reset_tcp(req.flow, 0.2)
    (r,) = frames(s)
    assert r[TCP].flags.R
    assert s.flows() == []


# ------------------------------------------------------------------------- counters and drops
def test_counters_are_ethernet_frames_and_bytes():
    """stats (get_stats): frames and Ethernet bytes each way, accumulated; the 10-byte
    virtio-net header of a vnet tap is not counted."""
    from slirpy import helper
    for offload in (-1, helper.TUN_F_CSUM):
        s = Stack(Config(), 0.0, offload=offload)
        pre = wire.VNET_NONE if offload >= 0 else b""
        arp = eth(ARP(op=1, hwsrc=GUEST_MAC, psrc="10.0.2.100", pdst="10.0.2.2"))
        for _ in range(2):
            s.receive_frame(pre + arp, 0.0)
        s.receive_frame(pre + arp[:10], 0.0)
        assert (s.stats.frames_in, s.stats.bytes_in) == (3, 2 * len(arp) + 10)
        out = s.frames_to_send(s._last_now)
        assert len(out) == 2 and all(len(f) == len(pre) + 42 for f in out)
        s.receive_frame(pre + arp, 0.0)
        s.frames_to_send(s._last_now)
        assert (s.stats.frames_out, s.stats.bytes_out) == (3, 3 * 42)
        assert s.stats.dropped["eth_truncated"] == 1
    s = Stack(Config(), 0.0, offload=0)
    s.receive_frame(wire.VNET_NONE, 0.0)  # a header and nothing after it
    assert s.stats.dropped["eth_truncated"] == 1 and "vnet_truncated" not in s.stats.dropped


def test_unknown_protocols_are_counted():
    s = learned(Stack(Config(enable_ipv6=True)))
    s.receive_frame(bytes(Ether(src=GUEST_MAC, dst=ROUTER_MAC, type=0x88CC) / b"lldp"), 0.0)
    s.receive_frame(eth(IP(src="10.0.2.100", dst="198.51.100.7", proto=47) / b"gre"), 0.0)
    s.receive_frame(eth(IPv6(src="fd00::100", dst="2001:db8::1", nh=47) / b"gre"), 0.0)
    s.receive_frame(eth(ARP(op=3, hwsrc=GUEST_MAC, psrc="10.0.2.100", pdst="10.0.2.2")), 0.0)
    s.receive_frame(eth(ARP(op=2, hwsrc=GUEST_MAC, psrc="10.0.2.100", pdst="10.0.2.2")), 0.0)
    assert s.frames_to_send(s._last_now) == [] and drain(s) == []
    d = s.stats.dropped
    assert (d["eth_unknown_type"], d["ipv4_unknown_proto"], d["ipv6_unknown_next_header"],
            d["arp_not_request"]) == (1, 1, 1, 1)
    assert sum(d.values()) == 4  # an ARP reply is taken (it teaches the MAC), not dropped


def test_guest_mac_is_learned_only_from_the_guests_own_addresses():
    """The guest's MAC comes from frames whose source address is the guest's (ARP sender, IPv4
    source, IPv6 link-local or fd00::/64 source), never from a multicast source MAC or from
    another address on the link; a new MAC for the guest's address replaces the old one."""
    s = Stack(Config(enable_ipv6=True))
    s.receive_frame(eth(ARP(op=1, hwsrc=OTHER_MAC, psrc="10.0.2.50", pdst="10.0.2.2"),
                        src=OTHER_MAC), 0.0)
    s.receive_frame(eth(IP(src="10.0.2.77", dst="198.51.100.7") / UDP(), src=OTHER_MAC), 0.0)
    s.receive_frame(eth(IP(src="10.0.2.100", dst="198.51.100.7") / UDP(),
                        src="01:00:5e:00:00:01"), 0.0)
    s.receive_frame(eth(IPv6(src="2001:db8::5", dst="2001:db8::1") / UDP(), src=OTHER_MAC), 0.0)
    s.receive_frame(eth(IPv6(src="fd00::100", dst="2001:db8::1") / UDP(),
                        src="33:33:00:00:00:01"), 0.0)
    s.frames_to_send(s._last_now)
    drain(s)
    s.send_udp(4, "198.51.100.7", 1, "10.0.2.100", 2, b"x", 5.0)
    (p,) = frames(s)
    assert ARP in p and p.dst == "ff:ff:ff:ff:ff:ff"  # still asking: nothing was learned
    s.receive_frame(eth(IPv6(src="fd00::100", dst="2001:db8::1") / UDP()), 5.0)
    assert [p.dst for p in frames(s)] == [GUEST_MAC]  # the held datagram, released
    s.receive_frame(eth(IPv6(src="fd00::100", dst="2001:db8::1") / UDP(), src=OTHER_MAC), 5.0)
    s.send_udp(4, "198.51.100.7", 1, "10.0.2.100", 2, b"y", 5.0)
    assert [p.dst for p in frames(s)] == [OTHER_MAC]


def test_interleaved_fragmented_datagrams_are_kept_apart():
    """RFC 791 3.2: fragments belong together by (source, destination, protocol, ID)."""
    from scapy.layers.inet import fragment
    s = learned(Stack(Config()))
    a = fragment(IP(src="10.0.2.100", dst="198.51.100.7", id=1) / UDP(sport=1, dport=2)
                 / (b"a" * 100), fragsize=48)
    b = fragment(IP(src="10.0.2.100", dst="198.51.100.7", id=2) / UDP(sport=1, dport=2)
                 / (b"b" * 100), fragsize=48)
    for x, y in zip(a, b):
        s.receive_frame(eth(x), 0.0)
        s.receive_frame(eth(y), 0.0)
    assert sorted(e.payload for e in drain(s)) == [b"a" * 100, b"b" * 100]


def test_interleaved_ipv6_fragmented_datagrams_are_kept_apart():
    """RFC 8200 4.5: fragments belong together by source, destination and Identification."""
    from scapy.layers.inet6 import IPv6ExtHdrFragment, fragment6
    s = learned(Stack(Config(enable_ipv6=True)), v6=True)
    a = fragment6(IPv6(src="fd00::100", dst="2001:db8::7") / IPv6ExtHdrFragment(id=1)
                  / UDP(sport=1, dport=2) / (b"a" * 2000), 1280)
    b = fragment6(IPv6(src="fd00::100", dst="2001:db8::7") / IPv6ExtHdrFragment(id=2)
                  / UDP(sport=1, dport=2) / (b"b" * 2000), 1280)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        s.receive_frame(eth(x), 0.0)
        s.receive_frame(eth(y), 0.0)
    assert sorted(e.payload for e in drain(s) if isinstance(e, events.UdpDatagram)) == \
        [b"a" * 2000, b"b" * 2000]


def test_ipv6_multicast_destinations_open_nothing():
    """RFC 1122 4.2.3.10: a SYN addressed to a multicast address is silently discarded; UDP to a
    multicast group is not NATed either (slirp4netns forwards no multicast). The one exception,
    DHCPv6 to ff02::1:2 port 547, is the only multicast datagram answered."""
    s = learned(Stack(Config(enable_ipv6=True)), v6=True)
    for dst in ("ff02::1", "ff02::1:2", "ff0e::1"):
        s.receive_frame(eth(IPv6(src="fd00::100", dst=dst) / TCP(sport=1000, dport=80,
                                                                 flags="S")), 0.0)
    s.receive_frame(eth(IPv6(src="fd00::100", dst="ff02::1:2") / UDP(sport=5353, dport=5353)
                        / b"x"), 0.0)
    s.receive_frame(eth(IPv6(src="fd00::100", dst="ff0e::1") / UDP(sport=1, dport=2) / b"x"),
                    0.0)
    assert frames(s) == [] and drain(s) == []
    assert s.stats.dropped["ipv6_multicast"] == 5


def test_ipv4_ids_differ_between_datagrams():
    """RFC 6864 4.2: datagrams that may be fragmented need IDs unique per source, destination
    and protocol for a while; consecutive datagrams never share one."""
    s = learned(Stack(Config()))
    for i in range(3):
        s.send_udp(4, "198.51.100.7", 1, "10.0.2.100", 2, b"%d" % i, 0.0)
    ids = [p[IP].id for p in frames(s)]
    assert len(set(ids)) == 3


def test_router_advertisements_start_at_creation():
    s = Stack(Config(enable_ipv6=True))
    assert s.get_timer() == 0.0
    s.handle_timer(0.0)
    (ra,) = frames(s)
    assert ICMPv6ND_RA in ra and ra.dst == "33:33:00:00:00:01"


def test_stats_as_the_api_reports_them():
    """README, get_stats: frames_in/frames_out/bytes_in/bytes_out and dropped (reason ->
    count, sorted by reason so replies compare byte for byte)."""
    s = learned(Stack(Config()))
    s.receive_frame(b"\x00" * 5, 0.0)
    s.receive_frame(eth(IP(src="10.0.2.100", dst="127.0.0.1") / UDP()), 0.0)
    s.receive_frame(b"\x00" * 5, 0.0)
    s.send_udp(4, "198.51.100.7", 1, "10.0.2.100", 2, b"x", 0.0)
    s.frames_to_send(s._last_now)
    d = s.stats.as_dict()
    assert list(d)[:5] == ["frames_in", "frames_out", "bytes_in", "bytes_out", "dropped"]
    assert (d["frames_in"], d["frames_out"], d["bytes_out"]) == (4, 1, 14 + 20 + 8 + 1)
    assert d["bytes_in"] == 42 + 5 + 42 + 5
    assert list(d["dropped"].items()) == [("eth_truncated", 2), ("ipv4_dst_martian", 1)]


def test_arp_for_an_unknown_guest_mac_asks_for_an_address_the_guest_answers():
    """RFC 826: a host answers a request only for its own protocol address. With the guest's MAC
    unknown, a datagram for any in-subnet address but a leased one is held and the request asks
    for the guest's configured address (10.0.2.100), whose reply then releases it."""
    s = Stack(Config())
    s.send_udp(4, "198.51.100.7", 1, "10.0.2.50", 2, b"x", 0.0)
    (req,) = frames(s)
    assert req[ARP].op == 1 and req[ARP].pdst == "10.0.2.100" and req[ARP].psrc == "10.0.2.2"
    s.receive_frame(eth(ARP(op=2, hwsrc=GUEST_MAC, psrc="10.0.2.100", pdst="10.0.2.2")), 0.1)
    (p,) = frames(s)
    assert p.dst == GUEST_MAC and p[IP].dst == "10.0.2.50" and bytes(p[UDP].payload) == b"x"
