"""Refusals as libslirp makes them, sans-IO: a SYN the glue refuses gets ICMP(v6) destination
unreachable quoting that SYN (no RST), or no answer at all. scapy reads the frames back."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, IPerror, TCPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, IPerror6, IPv6
from scapy.layers.l2 import Ether

from slirpy.config import Config
from slirpy.stack import events
from slirpy.stack.stack import Stack

from test_stack import GUEST_MAC, ROUTER_MAC, drain_events, eth, learned

ISN = 2**32 - 7  # the guest's initial sequence number, near the wrap


def _syn(s, family, dst, dport=80, sport=40000, isn=ISN):
    if family == 4:
        pkt = IP(src="10.0.2.100", dst=dst)
    else:
        pkt = IPv6(src="fd00::100", dst=dst)
    s.receive_frame(eth(pkt / TCP(sport=sport, dport=dport, seq=isn, flags="S", window=64240,
                                  options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7)])), 0.0)
    assert s.frames_to_send(0.0) == []  # the SYN waits for the glue's decision
    (req,) = [e for e in drain_events(s) if isinstance(e, events.TcpConnectRequest)]
    return req


def _checksum_ok(p, layer):
    """scapy recomputes the layer's checksum; it must be the one on the wire."""
    field = "cksum" if layer is ICMPv6DestUnreach else "chksum"
    q = p.copy()
    delattr(q[layer], field)
    return getattr(Ether(bytes(q))[layer], field) == getattr(p[layer], field)


@pytest.mark.parametrize("unreach, code", [("net", 0), ("host", 1)])
def test_refused_syn_v4_gets_icmp_unreachable_quoting_it(unreach, code):
    s = learned(Stack(Config(disable_host_loopback=True)))
    req = _syn(s, 4, "10.0.2.2")
    s.refuse_tcp(req.flow, unreach, "host_loopback_disabled", 1.0)
    (f,) = s.frames_to_send(1.0)  # one frame: the ICMP error, no RST
    p = Ether(bytes(f))
    assert (p.src, p.dst) == (ROUTER_MAC, GUEST_MAC)
    assert (p[IP].src, p[IP].dst, p[IP].proto) == ("10.0.2.2", "10.0.2.100", 1)
    assert (p[ICMP].type, p[ICMP].code) == (3, code)
    assert _checksum_ok(p, ICMP) and _checksum_ok(p, IP)
    q = p[IPerror]
    assert (q.src, q.dst, q.proto, q.ihl) == ("10.0.2.100", "10.0.2.2", 6, 5)
    t = p[TCPerror]
    assert (t.sport, t.dport, t.seq, t.flags) == (40000, 80, ISN, "S")
    assert TCP not in p
    assert s.stats.dropped["tcp_connect_host_loopback_disabled"] == 1
    assert [e for e in drain_events(s) if isinstance(e, events.TcpClosed)] == [
        events.TcpClosed(req.flow)]
    # the flow is forgotten: the guest's next SYN is a new request, not an answer from a stale flow
    req2 = _syn(s, 4, "10.0.2.2")
    assert req2.flow != req.flow


@pytest.mark.parametrize("unreach, code", [("net", 0), ("host", 3)])
def test_refused_syn_v6_gets_icmpv6_unreachable_from_fe80_2(unreach, code):
    s = learned(Stack(Config(enable_ipv6=True, disable_host_loopback=True)))
    req = _syn(s, 6, "fd00::2", dport=22)
    s.refuse_tcp(req.flow, unreach, "host_loopback_disabled", 1.0)
    (f,) = s.frames_to_send(1.0)
    p = Ether(bytes(f))
    assert (p[IPv6].src, p[IPv6].dst, p[IPv6].nh) == ("fe80::2", "fd00::100", 58)
    assert (p[ICMPv6DestUnreach].type, p[ICMPv6DestUnreach].code) == (1, code)
    assert _checksum_ok(p, ICMPv6DestUnreach)
    q = p[IPerror6]
    assert (q.src, q.dst, q.nh) == ("fd00::100", "fd00::2", 6)
    t = p[TCPerror]
    assert (t.sport, t.dport, t.seq, t.flags) == (40000, 22, ISN, "S")


def test_silent_refusal_sends_nothing():
    """--disable-dns: the SYN to .3 gets no answer at all (no RST, no ICMP)."""
    s = learned(Stack(Config(disable_dns=True)))
    req = _syn(s, 4, "10.0.2.3", dport=53)
    s.refuse_tcp(req.flow, None, "dns_disabled", 1.0)
    assert s.frames_to_send(1.0) == []
    assert s.stats.dropped["tcp_connect_dns_disabled"] == 1
    assert s.flows() == []
    # a retransmitted SYN is a new request again (the glue refuses it again), still no answer
    req2 = _syn(s, 4, "10.0.2.3", dport=53)
    s.refuse_tcp(req2.flow, None, "dns_disabled", 2.0)
    assert s.frames_to_send(2.0) == [] and s.stats.dropped["tcp_connect_dns_disabled"] == 2


def test_refuse_after_the_syn_is_an_rst():
    """refuse_tcp on a flow no longer pending (accepted meanwhile) falls back to an RST."""
    s = learned(Stack(Config()))
    req = _syn(s, 4, "198.51.100.7")
    s.accept_tcp(req.flow, 0.5)
    s.frames_to_send(0.5)
    s.refuse_tcp(req.flow, "net", "unreachable", 1.0)
    (f,) = s.frames_to_send(1.0)
    p = Ether(bytes(f))
    assert ICMP not in p and p[TCP].flags.R


def test_refuse_unknown_flow_is_a_no_op():
    s = learned(Stack(Config()))
    s.refuse_tcp(12345, "net", "unreachable", 1.0)
    assert s.frames_to_send(1.0) == []


def _policy_nat_daemon(stack):
    from types import SimpleNamespace
    return SimpleNamespace(config=stack.config, stack=stack, now=lambda: 1.0, flush=lambda: None,
                           hot_ep=None, nursery=None)


def _deny_port_22(proto, family, dst, dport):
    from slirpy.stack import addrmap
    return addrmap.refuse("policy_rule_1", "admin") if dport in (22, 0) else None


@pytest.mark.parametrize("family, dst", [(4, "192.0.2.9"), (6, "2001:db8::9")])
def test_a_policy_verdict_reaches_the_guest_as_admin_prohibited_tcp(family, dst):
    """An egress policy plugs into the address rules (stack/addrmap.py) and the TCP NAT answers
    its verdict as ICMP administratively prohibited, with no change to the NAT."""
    from slirpy.nat import TcpNat
    from slirpy.stack.addrmap import AddressMap
    s = learned(Stack(Config(enable_ipv6=True)))
    nat = TcpNat(_policy_nat_daemon(s), AddressMap(s.config, policy=_deny_port_22), None)
    nat.handlers()[events.TcpConnectRequest](_syn(s, family, dst, dport=22))
    (f,) = s.frames_to_send(1.0)
    p = Ether(bytes(f))
    if family == 4:
        assert (p[ICMP].type, p[ICMP].code) == (3, 13) and p[TCPerror].dport == 22
    else:
        assert (p[ICMPv6DestUnreach].type, p[ICMPv6DestUnreach].code) == (1, 1)
    assert s.stats.dropped["tcp_connect_policy_rule_1"] == 1


def test_a_policy_verdict_reaches_the_guest_as_admin_prohibited_udp_and_icmp():
    from slirpy.icmp_nat import IcmpNat
    from slirpy.stack.addrmap import AddressMap
    from slirpy.udp_nat import UdpNat
    s = learned(Stack(Config()))
    d = _policy_nat_daemon(s)
    addrs = AddressMap(s.config, policy=_deny_port_22)
    UdpNat(d, addrs, None).handle(events.UdpDatagram(4, "10.0.2.100", 5000, "192.0.2.9", 22,
                                                     b"knock"))
    IcmpNat(d, addrs).handle(events.IcmpEchoRequest(4, "10.0.2.100", "192.0.2.9", 7, 1, b"ping"))
    udp, icmp = (Ether(bytes(f)) for f in s.frames_to_send(1.0))
    assert (udp[ICMP].type, udp[ICMP].code, udp[IPerror].proto) == (3, 13, 17)
    assert (icmp[ICMP].type, icmp[ICMP].code, icmp[IPerror].proto) == (3, 13, 1)
    assert s.stats.dropped["udp_policy_rule_1"] == 1 and s.stats.dropped["icmp_policy_rule_1"] == 1
